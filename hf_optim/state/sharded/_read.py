"""Reading a sharded checkpoint's manifest and shard headers, checked; the DCP reader over the checked plan."""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import DefaultLoadPlanner, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.futures import Future

from hf_optim.errors import CheckpointError
from hf_optim.state.format import parse_json
from hf_optim.state.io import OpenFile, checkpoint_roots, open_file, read_json, read_region, read_safetensors
from hf_optim.state.model import Chunk
from hf_optim.state.sharded._format import (
    ACCUMULATOR_PREFIX,
    CHECKPOINT_ID_KEY,
    DCP_INFO_KEY,
    DCP_OFFSETS_KEY,
    DTYPES,
    KIND,
    RESERVED,
    SHARD_FILE_RE,
    SHARDED_FORMAT_VERSION,
    SHARDED_MANIFEST_NAME,
    ST_DTYPES,
)


def has_sharded_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a sharded checkpoint (its manifest).

    Tells a sharded (FSDP2, DeepSpeed ZeRO) checkpoint from an ordinary one without reading it.

    Args:
        directory: The folder to look into.

    Returns:
        True if the folder has ``optimizer.sharded.json``.

    Example:
        ```python
        import torch
        import hf_optim

        hf_optim.save_state("ckpt", hf_optim.AdamW(torch.nn.Linear(2, 2).parameters()))
        assert hf_optim.has_state("ckpt") and not hf_optim.has_sharded_state("ckpt")
        ```
    """
    return os.path.isfile(os.path.join(os.fspath(directory), SHARDED_MANIFEST_NAME))


@dataclass(frozen=True)
class TensorPlan:
    key: str
    name: str
    state_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Manifest:
    directory: str
    checkpoint_id: str
    shard_dir: str
    doc: dict[str, Any]
    listed: tuple[str, ...]  # the shard files the manifest lists
    tensors: dict[str, TensorPlan]
    #: shard file name -> the open file whose header was checked (see open_shards, close_manifest)
    files: dict[str, OpenFile]
    mapped: bool  # whether the manifest records every chunk's file (so a process may open only some files)


def close_manifest(manifest: Manifest | None) -> None:
    for f in manifest.files.values() if manifest is not None else ():
        f.close()
    if manifest is not None:
        manifest.files.clear()


def _open(path: str, directory: str) -> OpenFile:
    """A checked, open file of the checkpoint (regular, resolving inside it or its Hub cache blobs)."""
    try:
        return open_file(path, roots=checkpoint_roots(directory))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None


def read_manifest_doc(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    f = _open(path, directory)
    try:
        doc = read_json(f)
    finally:
        f.close()
    if not isinstance(doc, dict) or doc.get("format") != KIND:
        raise CheckpointError(f"{path}: not a sharded hf_optim checkpoint")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format version {version!r}")
    return doc


def _listed_files(doc: dict[str, Any], path: str) -> tuple[str, str, tuple[str, ...]]:
    """The checkpoint id, the shard folder and the shard file names of a manifest, checked."""
    checkpoint_id = doc.get("checkpoint_id")
    shards = doc.get("shards")
    if not isinstance(checkpoint_id, str) or not re.fullmatch(r"[0-9a-f]{32}", checkpoint_id):
        raise CheckpointError(f"{path}: bad checkpoint_id {checkpoint_id!r}"[:300])
    if not isinstance(shards, dict) or shards.get("folder") != f"optimizer-shards-{checkpoint_id}":
        raise CheckpointError(f"{path}: the shard folder must be optimizer-shards-{checkpoint_id}")
    files = shards.get("files")
    if (
        not isinstance(files, list)
        or not files
        or not all(isinstance(f, str) and SHARD_FILE_RE.fullmatch(f) for f in files)
        or len(set(files)) != len(files)
    ):
        raise CheckpointError(f"{path}: 'shards.files' must list shard-*.safetensors file names")
    return checkpoint_id, shards["folder"], tuple(files)


def sharded_manifest_files(path: str) -> list[str]:
    """The files a sharded manifest references (relative paths, itself first): to download exactly them."""
    _, folder, files = _listed_files(read_manifest_doc(os.path.dirname(path)), path)
    return [SHARDED_MANIFEST_NAME, *(f"{folder}/{name}" for name in files)]


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{where}: expected a list of integers, got {value!r}"[:300])
    if any(v < 0 for v in value):
        raise CheckpointError(f"{where}: negative size or offset {value!r}")
    return tuple(value)


def read_manifest(directory: str, *, open_all: bool = True) -> Manifest:
    """The manifest and the chunk plan of every sharded tensor, checked.

    The manifest records which file holds each chunk; the plan comes from there and must tile every tensor.
    ``open_all``: open every shard file and check its header against the plan now; otherwise nothing in the shard
    folder is touched, and :func:`open_shards` opens the files a process reads (a machine may hold only those: a
    partial Hub download). The files stay open: the data is later read through the very descriptors whose
    headers were checked. Close them with :func:`close_manifest`. (Manifests without the chunk record are
    planned from every shard header.)
    """
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    doc = read_manifest_doc(directory)
    checkpoint_id, folder, files = _listed_files(doc, path)
    shard_dir = os.path.join(directory, folder)
    expected, mapped = _expected_tensors(doc, path, files)
    manifest = Manifest(directory, checkpoint_id, shard_dir, doc, files, {}, {}, mapped is not None)
    try:
        if mapped is not None:
            for key, (shape, dtype, name, state_key) in expected.items():
                _check_tiling(key, shape, mapped[key], shard_dir)
                manifest.tensors[key] = TensorPlan(key, name, state_key, shape, dtype, tuple(mapped[key]))
            if open_all:
                open_shards(manifest, files)
            return manifest
        _check_folder(manifest)
        chunks: dict[str, list[Chunk]] = {key: [] for key in expected}
        for name in files:
            label = os.path.join(shard_dir, name)
            manifest.files[name] = _open(label, directory)
            _read_shard_header(label, manifest.files[name], expected, chunks)
        for key, (shape, dtype, name, state_key) in expected.items():
            _check_tiling(key, shape, chunks[key], shard_dir)
            manifest.tensors[key] = TensorPlan(key, name, state_key, shape, dtype, tuple(chunks[key]))
    except BaseException:
        close_manifest(manifest)
        raise
    return manifest


def _check_folder(manifest: Manifest) -> None:
    """The shard folder is a directory holding no shard file the manifest does not list."""
    try:
        if not stat.S_ISDIR(os.lstat(manifest.shard_dir).st_mode):
            raise CheckpointError(f"{manifest.shard_dir}: not a directory")
        present = {f for f in os.listdir(manifest.shard_dir) if f.endswith(".safetensors")}
    except FileNotFoundError:
        raise CheckpointError(f"{manifest.shard_dir}: shard folder is missing") from None
    unlisted = sorted(present - set(manifest.listed))
    if unlisted:
        raise CheckpointError(
            f"{manifest.shard_dir}: shard files differ from the manifest (unlisted {unlisted})"
        )


def open_shards(manifest: Manifest, names: Iterable[str]) -> None:
    """Open the shard files ``names`` and check that each header holds exactly the chunks the plan gives it."""
    _check_folder(manifest)
    expected = {
        key: (plan.shape, plan.dtype, plan.name, plan.state_key) for key, plan in manifest.tensors.items()
    }
    for name in sorted(set(names) - set(manifest.files)):
        if name not in manifest.listed:
            raise CheckpointError(f"{manifest.shard_dir}: {name} is not a shard file of the manifest")
        label = os.path.join(manifest.shard_dir, name)
        manifest.files[name] = _open(label, manifest.directory)
        found: dict[str, list[Chunk]] = {key: [] for key in expected}
        written_by = _read_shard_header(label, manifest.files[name], expected, found)
        if manifest.mapped and written_by != manifest.checkpoint_id:
            raise CheckpointError(
                f"{label}: written by another save (checkpoint id {written_by!r}, the manifest's is "
                f"{manifest.checkpoint_id!r})"
            )
        held = {(key, c.offsets, c.sizes) for key, chunks in found.items() for c in chunks}
        planned = {
            (key, c.offsets, c.sizes)
            for key, plan in manifest.tensors.items()
            for c in plan.chunks
            if c.file == name
        }
        if held != planned:
            key = sorted({k for k, *_ in held ^ planned})[0]
            raise CheckpointError(f"{label}: its chunks of {key} differ from the manifest's")


def needed_files(manifest: Manifest, targets: Mapping[str, torch.Tensor]) -> set[str]:
    """The shard files DCP reads to fill ``targets`` (``state.<name>.<key>`` -> tensor or DTensor of the global
    shape, or the parameter itself: only its shape and placement matter) on this process."""
    metadata = checked_metadata(manifest)
    try:
        planner = DefaultLoadPlanner()
        planner.set_up_planner(dict(targets), metadata, is_coordinator=False)
        return {metadata.storage_data[item.storage_index] for item in planner.create_local_plan().items}
    except Exception as exc:  # a CheckpointError, so that every rank hears of it (no rank may raise alone)
        raise CheckpointError(
            f"{manifest.shard_dir}: cannot plan the reads ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None


def _read_shard_header(
    label: str, file: OpenFile, expected: Mapping[str, tuple[Any, ...]], chunks: dict[str, list[Chunk]]
) -> str | None:
    """Check one shard file's header (tensor names, dtypes, DCP offsets) and record its chunks (empty ones
    hold no data and are left out); returns the checkpoint id its metadata names, if any."""
    try:
        with safe_open(file.reader_path(), "pt", backend="pread") as f:
            checkpoint_id = (f.metadata() or {}).get(CHECKPOINT_ID_KEY)
            info_raw = (f.metadata() or {}).get(DCP_INFO_KEY)
            info = parse_json(info_raw.encode(), f"{label}: {DCP_INFO_KEY}") if info_raw else None
            if not isinstance(info, dict):
                raise CheckpointError(
                    f"{label}: no valid {DCP_INFO_KEY} metadata: not a shard of a sharded save"
                )
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if key not in expected:
                    raise CheckpointError(f"{label}: tensor {key!r} is not in the manifest")
                shape, dtype = expected[key][0], expected[key][1]
                sl = f.get_slice(key)
                sizes = tuple(sl.get_shape())
                entry = info.get(key)
                offsets = _int_list(
                    entry.get(DCP_OFFSETS_KEY) if isinstance(entry, dict) else None, f"{label}: {key}"
                )
                if ST_DTYPES.get(sl.get_dtype()) is not dtype:
                    raise CheckpointError(
                        f"{label}: {key} has dtype {sl.get_dtype()}, the manifest says {dtype}"
                    )
                if (
                    len(offsets) != len(shape)
                    or len(sizes) != len(shape)
                    or any(o + n > g for o, n, g in zip(offsets, sizes, shape, strict=True))
                ):
                    raise CheckpointError(
                        f"{label}: {key} chunk at {list(offsets)} of size {list(sizes)} lies outside its "
                        f"global shape {list(shape)}"
                    )
                if math.prod(sizes):
                    chunks[key].append(Chunk(os.path.basename(label), offsets, sizes))
    except SafetensorError as exc:
        raise CheckpointError(f"{label}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({exc.strerror})") from None
    return checkpoint_id


def checked_metadata(manifest: Manifest, load_id: str = "") -> Metadata:
    """DCP's ``Metadata`` of the checked plan: every chunk of every tensor and the file that holds it."""
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage_data: dict[MetadataIndex, str] = {}
    for key, plan in manifest.tensors.items():
        state_dict_metadata[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=plan.dtype),
            size=torch.Size(plan.shape),
            chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in plan.chunks],
        )
        for c in plan.chunks:
            storage_data[MetadataIndex(fqn=key, offset=torch.Size(c.offsets))] = c.file
    return Metadata(
        state_dict_metadata=state_dict_metadata,
        storage_data=storage_data,
        storage_meta=StorageMeta(load_id=load_id),
    )


class CheckedReader(HuggingFaceStorageReader):
    """``HuggingFaceStorageReader`` over a checked plan: metadata from the validated headers (nothing is
    re-read or unpickled), data read with ``pread`` through the descriptors whose headers were checked, only
    the byte ranges of the planned regions."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.shard_dir)
        self._manifest = manifest

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return checked_metadata(self._manifest, load_id=self.load_id)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index], []).append(item)
        for name, items in per_file.items():
            label = os.path.join(self._manifest.shard_dir, name)
            if name not in self._manifest.files:  # planned with needed_files, so not expected
                raise CheckpointError(f"{label}: needed but not opened")
            shard = read_safetensors(self._manifest.files[name])
            for item in items:
                target = planner.resolve_tensor(item).detach()
                source = read_region(
                    shard, item.storage_index.fqn, tuple(item.storage_offsets), tuple(item.lengths)
                )
                if target.size() != source.size():
                    raise CheckpointError(f"{label}: {item.storage_index.fqn} chunk does not fit its target")
                target.copy_(source)
                planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


def _expected_tensors(
    doc: dict[str, Any], path: str, files: Sequence[str]
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, str, str]], dict[str, list[Chunk]] | None]:
    """Every sharded tensor's global shape, dtype, parameter and state key (``gradients.<i>`` for the
    accumulator's, whose parameter is one laid out like it); and, when the manifest records them (every entry or
    none), its chunks and their files."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype, str, str]] = {}
    mapped: dict[str, list[Chunk]] = {}

    def add(entry: dict[str, Any], key: str, name: str, state_key: str, where: str) -> None:
        if entry.get("sharded") != key:
            raise CheckpointError(f"{where} points at tensor {entry.get('sharded')!r}, not {key!r}"[:300])
        saved_dtype = entry.get("dtype")
        dtype = DTYPES.get(saved_dtype) if isinstance(saved_dtype, str) else None
        if dtype is None or not dtype.is_floating_point:
            raise CheckpointError(f"{where} has dtype {entry.get('dtype')!r}"[:300])
        out[key] = (_int_list(entry.get("shape"), f"{where}: shape"), dtype, name, state_key)
        if "chunks" in entry:
            mapped[key] = _chunk_list(entry["chunks"], files, where)

    state = doc.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state' must be an object")
    for name, record in state.items():
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: state[{name!r}] must be an object")
        for state_key, entry in record.items():
            where = f"{path}: state[{name!r}][{state_key!r}]"
            if state_key in RESERVED:
                raise CheckpointError(f"{path}: state[{name!r}] uses the reserved key {state_key!r}")
            if not isinstance(entry, dict) or not ({"sharded"} <= entry.keys() or entry.keys() == {"value"}):
                raise CheckpointError(f"{where} is malformed")
            if "sharded" in entry:
                add(entry, f"state.{name}.{state_key}", name, state_key, where)
    accumulator = doc.get("accumulator")
    if accumulator is not None:
        gradients = accumulator.get("gradients") if isinstance(accumulator, dict) else None
        if not isinstance(gradients, list):
            raise CheckpointError(f"{path}: 'accumulator' must be an object with a 'gradients' list")
        for i, entry in enumerate(gradients):
            where = f"{path}: accumulator gradient {i}"
            if entry is None:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("parameter"), str):
                raise CheckpointError(f"{where} is malformed")
            add(entry, f"{ACCUMULATOR_PREFIX}{i}", entry["parameter"], f"gradients.{i}", where)
    if mapped and mapped.keys() != out.keys():
        raise CheckpointError(f"{path}: some tensors record their chunks, others do not")
    return out, (mapped if mapped else None)


def _chunk_list(value: Any, files: Sequence[str], where: str) -> list[Chunk]:
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: 'chunks' must be a list")
    chunks = []
    for item in value:
        if (
            not isinstance(item, dict)
            or set(item) != {"file", "offsets", "sizes"}
            or item["file"] not in files
        ):
            raise CheckpointError(f"{where}: a chunk must name a listed shard file, its offsets and sizes")
        chunk = Chunk(item["file"], _int_list(item["offsets"], where), _int_list(item["sizes"], where))
        if math.prod(chunk.sizes):  # an empty chunk holds no data (a process whose shard is empty)
            chunks.append(chunk)
    return chunks


def _check_tiling(key: str, shape: tuple[int, ...], chunks: Sequence[Chunk], shard_dir: str) -> None:
    """The chunks tile ``shape`` as DTensor shards do: in every dimension their ranges partition it, and the
    chunks are the grid those partitions make, each cell once (no gap, no overlap). Linear in the chunks, up to
    sorting, whatever a manifest records."""
    for c in chunks:
        if (
            len(c.offsets) != len(shape)
            or len(c.sizes) != len(shape)
            or any(o + n > g for o, n, g in zip(c.offsets, c.sizes, shape, strict=True))
        ):
            raise CheckpointError(
                f"{shard_dir}: {key}: chunk at {list(c.offsets)} of size {list(c.sizes)} in {c.file} lies outside "
                f"its global shape {list(shape)}"
            )
    files: set[str] = set()
    for c in chunks:  # a file holds a tensor name once
        if c.file in files:
            raise CheckpointError(f"{shard_dir}: {key}: two chunks recorded in {c.file}")
        files.add(c.file)
    cells = {tuple(zip(c.offsets, c.sizes, strict=True)) for c in chunks}
    if len(cells) != len(chunks):
        raise CheckpointError(f"{shard_dir}: {key}: two chunks overlap (the same range recorded twice)")
    grid = 1
    for d, size in enumerate(shape):
        ranges = sorted({(c.offsets[d], c.sizes[d]) for c in chunks})
        end = 0
        for offset, length in ranges:
            if offset != end:
                what = "overlap" if offset < end else "leave a gap"
                raise CheckpointError(
                    f"{shard_dir}: {key}: chunks {what} in dimension {d} at {min(offset, end)}"
                )
            end = offset + length
        if end != size:
            raise CheckpointError(
                f"{shard_dir}: {key}: the chunks cover {end} of its {size} elements in dimension {d} "
                "(missing or extra shard)"
            )
        grid *= len(ranges)
    if grid != len(chunks):  # distinct cells of the grid: exactly all of them
        raise CheckpointError(
            f"{shard_dir}: {key}: the chunks cover {len(chunks)} of the {grid} cells their ranges make "
            "(missing or extra shard)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
