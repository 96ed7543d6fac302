"""Reading a sharded checkpoint's manifest and shard headers, checked; the DCP reader over the checked plan."""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import (
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
from hf_optim.state.sharded._format import (
    DCP_INFO_KEY,
    DCP_OFFSETS_KEY,
    DTYPES,
    KIND,
    RESERVED,
    SHARD_DIR_RE,
    SHARD_FILE_RE,
    SHARDED_FORMAT_VERSION,
    SHARDED_MANIFEST_NAME,
    ST_DTYPES,
)


def has_sharded_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a sharded checkpoint (its manifest)."""
    return os.path.isfile(os.path.join(os.fspath(directory), SHARDED_MANIFEST_NAME))


@dataclass(frozen=True)
class Chunk:
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


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
    tensors: dict[str, TensorPlan]
    files: dict[
        str, OpenFile
    ]  # shard file name -> the open file whose header was checked (see close_manifest)


def close_manifest(manifest: Manifest | None) -> None:
    for f in manifest.files.values() if manifest is not None else ():
        f.close()


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


def sharded_manifest_files(path: str) -> list[str]:
    """The files a sharded manifest references (relative paths, itself first): to download exactly them."""
    directory = os.path.dirname(path)
    doc = read_manifest_doc(directory)
    shards = doc.get("shards")
    checkpoint_id = doc.get("checkpoint_id")
    folder = shards.get("folder") if isinstance(shards, dict) else None
    files = shards.get("files") if isinstance(shards, dict) else None
    if (
        not isinstance(checkpoint_id, str)
        or folder != f"optimizer-shards-{checkpoint_id}"
        or not SHARD_DIR_RE.match(folder)
        or not isinstance(files, list)
        or not all(isinstance(f, str) and SHARD_FILE_RE.match(f) for f in files)
    ):
        raise CheckpointError(f"{path}: malformed 'shards'")
    return [SHARDED_MANIFEST_NAME, *(f"{folder}/{name}" for name in files)]


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{where}: expected a list of integers, got {value!r}"[:300])
    if any(v < 0 for v in value):
        raise CheckpointError(f"{where}: negative size or offset {value!r}")
    return tuple(value)


def read_manifest(directory: str) -> Manifest:
    """The manifest and the chunk plan of every sharded tensor, checked against the shard headers.

    The shard files stay open (``Manifest.fds``): the data is later read through the very descriptors whose
    headers were checked. Close them with :func:`close_manifest`.
    """
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    doc = read_manifest_doc(directory)
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
        or not all(isinstance(f, str) and SHARD_FILE_RE.match(f) for f in files)
        or len(set(files)) != len(files)
    ):
        raise CheckpointError(f"{path}: 'shards.files' must list shard-*.safetensors file names")
    shard_dir = os.path.join(directory, shards["folder"])
    try:
        if not stat.S_ISDIR(os.lstat(shard_dir).st_mode):
            raise CheckpointError(f"{shard_dir}: not a directory")
        present = {f for f in os.listdir(shard_dir) if f.endswith(".safetensors")}
    except FileNotFoundError:
        raise CheckpointError(f"{shard_dir}: shard folder is missing") from None
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise CheckpointError(
            f"{shard_dir}: shard files differ from the manifest (missing {missing}, unlisted {extra})"
        )

    expected = _expected_tensors(doc, path)
    chunks: dict[str, list[Chunk]] = {key: [] for key in expected}
    opened: dict[str, OpenFile] = {}
    try:
        for name in files:
            label = os.path.join(shard_dir, name)
            opened[name] = _open(label, directory)
            _read_shard_header(label, opened[name], expected, chunks)
        plans = {}
        for key, (shape, dtype, name, state_key) in expected.items():
            _check_tiling(key, shape, chunks[key], shard_dir)
            plans[key] = TensorPlan(key, name, state_key, shape, dtype, tuple(chunks[key]))
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return Manifest(directory, checkpoint_id, shard_dir, doc, plans, opened)


def _read_shard_header(
    label: str, file: OpenFile, expected: Mapping[str, tuple[Any, ...]], chunks: dict[str, list[Chunk]]
) -> None:
    """Check one shard file's header (tensor names, dtypes, DCP offsets) and record its chunks."""
    try:
        with safe_open(file.reader_path(), "pt", backend="pread") as f:
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
                chunks[key].append(Chunk(os.path.basename(label), offsets, sizes))
    except SafetensorError as exc:
        raise CheckpointError(f"{label}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({exc.strerror})") from None


class CheckedReader(HuggingFaceStorageReader):
    """``HuggingFaceStorageReader`` over a checked plan: metadata from the validated headers (nothing is
    re-read or unpickled), data read with ``pread`` through the descriptors whose headers were checked, only
    the byte ranges of the planned regions."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.shard_dir)
        self._manifest = manifest

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        state_dict_metadata: dict[str, TensorStorageMetadata] = {}
        storage_data: dict[MetadataIndex, str] = {}
        for key, plan in self._manifest.tensors.items():
            state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=plan.dtype),
                size=torch.Size(plan.shape),
                chunks=[
                    ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in plan.chunks
                ],
            )
            for c in plan.chunks:
                storage_data[MetadataIndex(fqn=key, offset=torch.Size(c.offsets))] = c.file
        return Metadata(
            state_dict_metadata=state_dict_metadata,
            storage_data=storage_data,
            storage_meta=StorageMeta(load_id=self.load_id),
        )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index], []).append(item)
        for name, items in per_file.items():
            label = os.path.join(self._manifest.shard_dir, name)
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
    doc: dict[str, Any], path: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype, str, str]]:
    state = doc.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state' must be an object")
    out = {}
    for name, record in state.items():
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: state[{name!r}] must be an object")
        for state_key, entry in record.items():
            if state_key in RESERVED:
                raise CheckpointError(f"{path}: state[{name!r}] uses the reserved key {state_key!r}")
            if not isinstance(entry, dict) or not ({"sharded"} <= entry.keys() or entry.keys() == {"value"}):
                raise CheckpointError(f"{path}: state[{name!r}][{state_key!r}] is malformed")
            if "sharded" not in entry:
                continue
            key = entry["sharded"]
            if key != f"state.{name}.{state_key}":
                raise CheckpointError(f"{path}: state[{name!r}][{state_key!r}] points at tensor {key!r}")
            dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
            if dtype is None or not dtype.is_floating_point:
                raise CheckpointError(
                    f"{path}: state[{name!r}][{state_key!r}] has dtype {entry.get('dtype')!r}"
                )
            out[key] = (_int_list(entry.get("shape"), f"{path}: {key} shape"), dtype, name, state_key)
    return out


def _check_tiling(key: str, shape: tuple[int, ...], chunks: Sequence[Chunk], shard_dir: str) -> None:
    """The chunks cover ``shape`` exactly: no gap, no overlap."""
    total = math.prod(shape)
    covered = sum(math.prod(c.sizes) for c in chunks)
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if (
                all(
                    max(ao, bo) < min(ao + asz, bo + bsz)
                    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
                )
                and math.prod(a.sizes)
                and math.prod(b.sizes)
            ):
                raise CheckpointError(f"{shard_dir}: {key}: chunks in {a.file} and {b.file} overlap")
    if covered != total:
        raise CheckpointError(
            f"{shard_dir}: {key}: the shards cover {covered} of its {total} elements (missing or extra shard)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
