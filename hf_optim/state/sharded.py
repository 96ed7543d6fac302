"""Sharded optimizer state (FSDP2 ``DTensor`` state) saved per process, resumed on any number of processes.

Every process writes its own shard of the state tensors with ``torch.distributed.checkpoint`` and its Hugging
Face safetensors storage (``HuggingFaceStorageWriter(save_distributed=True)``: one safetensors file per process,
no pickled ``.metadata``), keyed ``state.<parameter name>.<state key>`` as in the single-process format. The rest
(param groups, non-tensor state, the scheduler, hf_optim's metadata) is one JSON manifest written once, last,
by rank 0. Loading validates the manifest and every shard header against the live model on every rank, agrees
on the verdict across ranks, then lets ``HuggingFaceStorageReader`` read the byte ranges each rank needs
(resharding to any number of processes, or to a plain single-process model).

Layout (``docs/FORMAT.md``, format version 2)::

    optimizer.sharded.json                 manifest: checkpoint id, groups, non-tensor state, scheduler
    optimizer-shards-<checkpoint id>/      shard-0000R-model-00001-of-00001.safetensors, one per rank

The manifest names its shard folder, and a new save writes a new folder before it replaces the manifest, so a
save killed on any rank leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
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
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from hf_optim._utils import unwrap_optimizer, unwrap_scheduler
from hf_optim.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "SHARDED_MANIFEST_NAME",
    "ShardedStateInfo",
    "has_sharded_state",
    "inspect_sharded_state",
    "is_sharded",
    "load_sharded_state",
    "save_sharded_state",
]

SHARDED_MANIFEST_NAME = "optimizer.sharded.json"
SHARDED_FORMAT_VERSION = 2
_KIND = "hf_optim.optimizer_sharded"
_SHARD_DIR_RE = re.compile(r"^optimizer-shards-([0-9a-f]{32})$")
_SHARD_FILE_RE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")
_DCP_INFO_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
_DCP_OFFSETS_KEY = "saved_offsets"
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_MAX_JSON_DEPTH = 64
_RESERVED = frozenset({"params", "param_names", "state", "param_groups"})
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
}


def is_sharded(optimizer: Any) -> bool:
    """Whether ``optimizer``'s parameters are ``DTensor``s (FSDP2 ``fully_shard``), so its state is sharded."""
    from torch.distributed.tensor import DTensor

    opt = unwrap_optimizer(optimizer)
    return any(isinstance(p, DTensor) for group in opt.param_groups for p in group["params"])


def has_sharded_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a sharded checkpoint (its manifest)."""
    return os.path.isfile(os.path.join(os.fspath(directory), SHARDED_MANIFEST_NAME))


# ---------------------------------------------------------------------------------------------------------------
# Process-group helpers: every rank must reach the same verdict
# ---------------------------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _agree(error: str | None) -> str | None:
    """Every rank's verdict: its own error, else the first error another rank met, else ``None``."""
    if not _distributed():
        return error
    data = (error or "").encode()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    if longest == 0:
        return None
    buf = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    if error is not None:
        return error
    for rank, (n, b) in enumerate(zip(sizes, bufs, strict=True)):
        if n.item():
            return f"{bytes(b[: int(n.item())].tolist()).decode(errors='replace')} (on rank {rank})"
    return None  # pragma: no cover - a non-zero size was seen above


def _broadcast_id() -> str:
    """A new checkpoint id, chosen by rank 0 and known to every rank (no pickling)."""
    raw = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.uint8)
    if _distributed():
        dist.broadcast(raw, src=0)
    return bytes(raw.tolist()).hex()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Parameter name for each optimizer parameter, by ``id``; every optimizer parameter must be in ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    missing = [
        i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in names
    ]
    if missing:
        raise ValueError(
            "the optimizer has parameters that are not in model (model= must be the trained model)"
        )
    return names


class _StreamingWriter(HuggingFaceStorageWriter):
    """``HuggingFaceStorageWriter`` writing each file with ``safetensors.torch.save_file``.

    The stock writer serialises a whole file to ``bytes`` in memory first (two transient copies of the
    process's shard of that file); ``save_file`` streams the tensors' memory to disk. Same file names, same
    ``DCP_SHARDING_INFO`` metadata, so ``HuggingFaceStorageReader`` reads the result unchanged.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        mapping: dict[str, int] | None = plan.storage_data.get("fqn_to_index_mapping")
        shard_index = plan.storage_data.get("shard_index", 1)
        highest = max(mapping.values()) if mapping else 1
        files: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"{item.index.fqn}: only tensors can be written to safetensors")
            files.setdefault(mapping[item.index.fqn] if mapping else 1, []).append(item)
        results: list[WriteResult] = []
        for index, items in sorted(files.items()):
            name = f"shard-{shard_index:05d}-model-{index:05d}-of-{highest:05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            offsets: dict[str, dict[str, list[int]]] = {}
            for item in items:
                tensor = planner.resolve_data(item).detach().cpu()
                if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                tensors[item.index.fqn] = tensor
                offsets[item.index.fqn] = {_DCP_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                results.append(WriteResult(index=item.index, size_in_bytes=tensor.nbytes, storage_data=name))
            metadata = {_DCP_INFO_KEY: json.dumps(offsets), "DCP_VERSION": "1.0", "format": "pt"}
            save_file(tensors, os.path.join(str(self.path), name), metadata=metadata)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


def _file_buckets(tensors: Mapping[str, torch.Tensor], max_file_size: int | str) -> dict[str, int]:
    """Tensor key -> file number (from 1), the same on every rank, so that each process's files stay near
    ``max_file_size``: tensors are split by their per-process share of the global size, in order, with
    huggingface_hub's shard splitter (which also parses ``"100MB"``-style sizes)."""
    world = dist.get_world_size() if _distributed() else 1
    shares = {
        key: torch.empty(math.ceil(t.numel() / world), dtype=t.dtype, device="meta")
        for key, t in tensors.items()
    }
    split = split_torch_state_dict_into_shards(
        shares, filename_pattern="file{suffix}", max_shard_size=max_file_size
    )
    return {key: i for i, keys in enumerate(split.filename_to_tensors.values(), start=1) for key in keys}


def _json_value(value: Any, where: str) -> Any:
    """A hyperparameter or state value as JSON (tuples become lists; the live optimizer restores the type)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return {"float": repr(value)}
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not _is_dtensor(value):
        return {"tensor_scalar": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"mapping": {k: _json_value(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a sharded checkpoint's JSON")


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def save_sharded_state(
    save_directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    model: torch.nn.Module,
    max_file_size: int | str = "100MB",
) -> str:
    """Save sharded (FSDP2) optimizer state: every process writes its shard; returns the manifest's path.

    Call it on every process of the group, with the same ``save_directory`` (a filesystem all processes see).
    No process gathers the state: each writes only its local shards, in files of about ``max_file_size``
    (``"100MB"`` or a number of bytes), which also bounds the memory the writer needs beyond the state itself.
    """
    import torch.distributed.checkpoint as dcp

    directory = os.fspath(save_directory)
    opt = unwrap_optimizer(optimizer)
    names = _param_names(model, opt)
    checkpoint_id = _broadcast_id()
    shard_dir = f"optimizer-shards-{checkpoint_id}"

    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    state: dict[str, dict[str, Any]] = {}
    for g, group in enumerate(opt.param_groups):
        hyper = {}
        for key, value in group.items():
            if key in ("params", "param_names"):
                continue
            hyper[key] = _json_value(value, f"param_groups[{g}][{key!r}]")
        groups.append({"params": [names[id(p)] for p in group["params"]], "hyperparameters": hyper})
        for p in group["params"]:
            entries = opt.state.get(p)
            if not entries:
                continue
            name = names[id(p)]
            record: dict[str, Any] = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if value.shape != p.shape:
                        raise ValueError(
                            f"state[{name!r}][{key!r}] has shape {list(value.shape)}, its parameter "
                            f"{list(p.shape)}: sharded saving supports state shaped like the parameter"
                        )
                    tensor_key = f"state.{name}.{key}"
                    tensors[tensor_key] = value
                    record[key] = {
                        "sharded": tensor_key,
                        "shape": list(value.shape),
                        "dtype": str(value.dtype).removeprefix("torch."),
                    }
                else:
                    record[key] = {"value": _json_value(value, f"state[{name!r}][{key!r}]")}
            state[name] = record
    scheduler_state = None
    if scheduler is not None:
        inner = unwrap_scheduler(scheduler)
        scheduler_state = {
            "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "config": getattr(inner, "hf_optim_config", None),
            "state_dict": _json_value(inner.state_dict(), "scheduler.state_dict()"),
        }

    if _rank() == 0:
        os.makedirs(directory, exist_ok=True)
    _barrier()
    tmp_dir = os.path.join(directory, f".{shard_dir}.tmp")
    error = None
    try:
        writer = _StreamingWriter(
            tmp_dir, fqn_to_index_mapping=_file_buckets(tensors, max_file_size), save_distributed=True
        )
        dcp.save(tensors, storage_writer=writer)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    error = _agree(error)
    if error is not None:
        raise OSError(f"saving sharded optimizer state to {directory!r} failed: {error}")

    manifest_path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    if _rank() == 0:
        shard_files = sorted(f for f in os.listdir(tmp_dir) if _SHARD_FILE_RE.match(f))
        world = dist.get_world_size() if _distributed() else 1
        manifest = {
            "format": _KIND,
            "format_version": SHARDED_FORMAT_VERSION,
            "checkpoint_id": checkpoint_id,
            "optimizer": {"class": f"{type(opt).__module__}.{type(opt).__qualname__}"},
            "world_size": world,
            "shards": {"folder": shard_dir, "files": shard_files},
            "param_groups": groups,
            "state": state,
            "scheduler": scheduler_state,
            "versions": {"torch": torch.__version__},
        }
        os.replace(tmp_dir, os.path.join(directory, shard_dir))
        tmp_manifest = os.path.join(directory, f".{SHARDED_MANIFEST_NAME}.{checkpoint_id}.tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
        os.replace(tmp_manifest, manifest_path)
        _remove_stale(directory, keep=shard_dir)
    _barrier()
    logger.debug("saved sharded optimizer state to %s", directory)
    return manifest_path


def _remove_stale(directory: str, *, keep: str) -> None:
    """Remove every shard folder but ``keep`` (the previous checkpoint's, and those of killed saves) and the
    temporary files of killed saves."""
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry == keep:
            continue
        if _SHARD_DIR_RE.match(entry) or (entry.startswith(".optimizer-shards-") and entry.endswith(".tmp")):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f".{SHARDED_MANIFEST_NAME}.") and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(path)


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _TensorPlan:
    key: str
    name: str
    state_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[_Chunk, ...]


@dataclass(frozen=True)
class _Manifest:
    directory: str
    checkpoint_id: str
    shard_dir: str
    doc: dict[str, Any]
    tensors: dict[str, _TensorPlan]
    fds: dict[str, int]  # shard file name -> the descriptor whose header was checked (close with _close)


def _close(manifest: _Manifest | None) -> None:
    for fd in manifest.fds.values() if manifest is not None else ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _fd_path(fd: int, fallback: str) -> str:
    """A path that opens the same file as ``fd`` (Linux: /proc/self/fd), so a rename cannot swap it."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else fallback


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _depth(node: Any, limit: int) -> int:
    stack = [(node, 1)]
    deepest = 0
    while stack:
        value, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(value, dict):
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, d + 1) for v in value)
    return deepest


def _open_regular(path: str, label: str) -> int:
    """An fd on ``path`` if it is a regular file (FIFOs, devices and symlinks refused before reading)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{label}: file is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{label}: not a regular file")
    return fd


def _read_manifest_doc(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    fd = _open_regular(path, path)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != _KIND:
        raise CheckpointError(f"{path}: not a sharded hf_optim checkpoint")
    if _depth(doc, _MAX_JSON_DEPTH) > _MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: nested deeper than {_MAX_JSON_DEPTH}")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format version {version!r}")
    return doc


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{where}: expected a list of integers, got {value!r}"[:300])
    if any(v < 0 for v in value):
        raise CheckpointError(f"{where}: negative size or offset {value!r}")
    return tuple(value)


def _read_manifest(directory: str) -> _Manifest:
    """The manifest and the chunk plan of every sharded tensor, checked against the shard headers.

    The shard files stay open (``_Manifest.fds``): the data is later read through the very descriptors whose
    headers were checked. Close them with :func:`_close`.
    """
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    doc = _read_manifest_doc(directory)
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
        or not all(isinstance(f, str) and _SHARD_FILE_RE.match(f) for f in files)
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
    chunks: dict[str, list[_Chunk]] = {key: [] for key in expected}
    fds: dict[str, int] = {}
    try:
        for name in files:
            label = os.path.join(shard_dir, name)
            fds[name] = _open_regular(label, label)
            _read_shard_header(label, fds[name], expected, chunks)
        plans = {}
        for key, (shape, dtype, name, state_key) in expected.items():
            _check_tiling(key, shape, chunks[key], shard_dir)
            plans[key] = _TensorPlan(key, name, state_key, shape, dtype, tuple(chunks[key]))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return _Manifest(directory, checkpoint_id, shard_dir, doc, plans, fds)


def _read_shard_header(
    label: str, fd: int, expected: Mapping[str, tuple[Any, ...]], chunks: dict[str, list[_Chunk]]
) -> None:
    """Check one shard file's header (tensor names, dtypes, DCP offsets) and record its chunks."""
    try:
        with safe_open(_fd_path(fd, label), "pt", backend="pread") as f:
            info_raw = (f.metadata() or {}).get(_DCP_INFO_KEY)
            try:
                info = json.loads(info_raw, object_pairs_hook=_no_duplicates) if info_raw else None
            except (ValueError, RecursionError):
                info = None
            if not isinstance(info, dict):
                raise CheckpointError(
                    f"{label}: no valid {_DCP_INFO_KEY} metadata: not a shard of a sharded save"
                )
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if key not in expected:
                    raise CheckpointError(f"{label}: tensor {key!r} is not in the manifest")
                shape, dtype = expected[key][0], expected[key][1]
                sl = f.get_slice(key)
                sizes = tuple(sl.get_shape())
                entry = info.get(key)
                offsets = _int_list(
                    entry.get(_DCP_OFFSETS_KEY) if isinstance(entry, dict) else None, f"{label}: {key}"
                )
                if _ST_DTYPES.get(sl.get_dtype()) is not dtype:
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
                chunks[key].append(_Chunk(os.path.basename(label), offsets, sizes))
    except SafetensorError as exc:
        raise CheckpointError(f"{label}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({exc.strerror})") from None


class _CheckedReader(HuggingFaceStorageReader):
    """``HuggingFaceStorageReader`` over a checked plan: metadata from the validated headers (nothing is
    re-read or unpickled), data read with ``pread`` through the descriptors whose headers were checked."""

    def __init__(self, manifest: _Manifest) -> None:
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
            with safe_open(_fd_path(self._manifest.fds[name], label), "pt", backend="pread") as f:
                for item in items:
                    region = tuple(
                        slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True)
                    )
                    target = planner.resolve_tensor(item).detach()
                    source = f.get_slice(item.storage_index.fqn)[region]
                    if target.size() != source.size():
                        raise CheckpointError(
                            f"{label}: {item.storage_index.fqn} chunk does not fit its target"
                        )
                    target.copy_(source)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
            if state_key in _RESERVED:
                raise CheckpointError(f"{path}: state[{name!r}] uses the reserved key {state_key!r}")
            if not isinstance(entry, dict) or not ({"sharded"} <= entry.keys() or entry.keys() == {"value"}):
                raise CheckpointError(f"{path}: state[{name!r}][{state_key!r}] is malformed")
            if "sharded" not in entry:
                continue
            key = entry["sharded"]
            if key != f"state.{name}.{state_key}":
                raise CheckpointError(f"{path}: state[{name!r}][{state_key!r}] points at tensor {key!r}")
            dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
            if dtype is None or not dtype.is_floating_point:
                raise CheckpointError(
                    f"{path}: state[{name!r}][{state_key!r}] has dtype {entry.get('dtype')!r}"
                )
            out[key] = (_int_list(entry.get("shape"), f"{path}: {key} shape"), dtype, name, state_key)
    return out


def _check_tiling(key: str, shape: tuple[int, ...], chunks: Sequence[_Chunk], shard_dir: str) -> None:
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


def _check_against_live(
    manifest: _Manifest, opt: torch.optim.Optimizer, names: Mapping[int, str], scheduler: Any
) -> None:
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    groups = manifest.doc.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise CheckpointError(
            f"{path}: {len(groups) if isinstance(groups, list) else '?'} param groups saved, "
            f"the optimizer has {len(opt.param_groups)}"
        )
    params = {}
    for g, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        if not isinstance(saved, dict) or set(saved) != {"params", "hyperparameters"}:
            raise CheckpointError(f"{path}: param_groups[{g}] is malformed")
        live_names = [names[id(p)] for p in live["params"]]
        if saved["params"] != live_names:
            raise CheckpointError(
                f"{path}: param_groups[{g}] holds other parameters than the optimizer's group {g}"
            )
        params.update({names[id(p)]: p for p in live["params"]})
        hyper = saved["hyperparameters"]
        live_keys = set(live) - {"params", "param_names"}
        if not isinstance(hyper, dict) or set(hyper) != live_keys:
            bad = sorted(set(hyper) ^ live_keys) if isinstance(hyper, dict) else []
            raise CheckpointError(
                f"{path}: param_groups[{g}] hyperparameters differ from the optimizer's: {bad}"
            )
        for key, value in hyper.items():
            _restore_value(value, live[key], f"{path}: param_groups[{g}][{key!r}]")
    state = manifest.doc["state"]
    for name, record in state.items():
        if name not in params:
            raise CheckpointError(f"{path}: state for {name!r}, which is not a parameter of the optimizer")
        for state_key, entry in record.items():
            if "value" in entry:
                _restore_value(entry["value"], None, f"{path}: state[{name!r}][{state_key!r}]")
    for plan in manifest.tensors.values():
        live_shape = tuple(params[plan.name].shape)
        if plan.shape != live_shape:
            raise CheckpointError(
                f"{path}: {plan.key} has global shape {list(plan.shape)}, parameter {plan.name!r} has "
                f"{list(live_shape)}"
            )
    saved_sched = manifest.doc.get("scheduler")
    if scheduler is not None:
        if not isinstance(saved_sched, dict) or "state_dict" not in saved_sched:
            raise CheckpointError(f"{path}: no scheduler state saved")
        _restore_value(
            saved_sched["state_dict"], unwrap_scheduler(scheduler).state_dict(), f"{path}: scheduler"
        )


def _restore_value(value: Any, like: Any, where: str) -> Any:
    """The Python value of a JSON value; with ``like`` (the live value), also of the same kind and structure.

    Mappings must have exactly ``like``'s keys, lists its length, numbers stay numbers and booleans booleans:
    what the live object holds decides what a checkpoint may put there.
    """
    if isinstance(value, dict):
        if set(value) == {"mapping"} and isinstance(value["mapping"], dict):
            saved = value["mapping"]
            if isinstance(like, Mapping) and set(saved) != {str(k) for k in like}:
                raise CheckpointError(
                    f"{where}: keys {sorted(saved)} differ from the live {sorted(map(str, like))}"[:400]
                )
            if like is not None and not isinstance(like, Mapping):
                raise CheckpointError(f"{where}: expected {type(like).__name__}, got an object")
            return {
                k: _restore_value(v, like[k] if like is not None else None, f"{where}[{k!r}]")
                for k, v in saved.items()
            }
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            out: Any = float(value["float"])
        elif set(value) == {"tensor_scalar", "dtype"} and value["dtype"] in _DTYPES:
            number = value["tensor_scalar"]
            if not isinstance(number, int | float) or isinstance(number, bool):
                raise CheckpointError(f"{where}: bad tensor value {number!r}"[:300])
            out = torch.tensor(number, dtype=_DTYPES[value["dtype"]])
        else:
            raise CheckpointError(f"{where}: unexpected object {sorted(value)!r}"[:300])
    elif isinstance(value, list):
        if like is not None and (not isinstance(like, list | tuple) or len(like) != len(value)):
            raise CheckpointError(
                f"{where}: expected {type(like).__name__} {_short(like)}, got a list of {len(value)}"
            )
        items = like if like is not None else [None] * len(value)
        out = [
            _restore_value(v, item, f"{where}[{i}]")
            for i, (v, item) in enumerate(zip(value, items, strict=True))
        ]
        return tuple(out) if isinstance(like, tuple) else out
    else:
        out = value
    if like is None:
        return out
    if isinstance(like, torch.Tensor):
        if not isinstance(out, torch.Tensor):
            raise CheckpointError(f"{where}: expected a tensor, got {value!r}"[:300])
        return out
    if isinstance(like, bool) or isinstance(out, bool):
        same = isinstance(like, bool) and isinstance(out, bool)
    elif isinstance(like, int | float):
        same = isinstance(out, int | float)
    else:
        same = type(out) is type(like) or (like is None and out is None)
    if not same:
        raise CheckpointError(f"{where}: expected {type(like).__name__}, got {value!r}"[:300])
    return out


def _short(value: Any) -> str:
    return f"of {len(value)}" if isinstance(value, list | tuple) else ""


def _keeps_step_on_device(opt: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Whether scalar state (``step``) lives on the parameter's device, as torch.optim does for fused/capturable."""
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    return bool(group.get("fused") or group.get("capturable"))


@contextlib.contextmanager
def _rollback(opt: torch.optim.Optimizer, scheduler: Any) -> Iterator[None]:
    state = {p: dict(entries) for p, entries in opt.state.items()}
    groups = [{k: (v if k == "params" else copy.copy(v)) for k, v in g.items()} for g in opt.param_groups]
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    sched_dict = copy.deepcopy(inner.__dict__) if inner is not None else None
    try:
        yield
    except BaseException:
        opt.state.clear()
        opt.state.update(state)
        for live, saved in zip(opt.param_groups, groups, strict=True):
            live.clear()
            live.update(saved)
        if inner is not None:
            inner.__dict__.clear()
            inner.__dict__.update(sched_dict)
        raise


def _read_tensors(manifest: _Manifest, targets: Mapping[str, torch.Tensor]) -> None:
    """Fill ``targets`` (``state.<name>.<key>`` -> tensor or DTensor of the global shape) from the shards:
    ``torch.distributed.checkpoint.load`` plans which byte ranges each rank needs, ``_CheckedReader`` reads them."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # one process without a process group: DCP warns that it "assumes" exactly that
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(dict(targets), storage_reader=_CheckedReader(manifest), no_dist=not _distributed())


def load_sharded_state(
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    model: torch.nn.Module,
) -> None:
    """Restore state saved by :func:`save_sharded_state` into an FSDP2 or a plain model's optimizer.

    Works on any number of processes (resharding), including one process with a plain model. Every rank
    validates the whole checkpoint against its live objects first, and all ranks raise together if any of them
    finds a problem, leaving every optimizer and scheduler unchanged.
    """
    directory = os.fspath(directory)
    opt = unwrap_optimizer(optimizer)
    names = _param_names(model, opt)
    manifest: _Manifest | None = None
    try:
        error = None
        try:
            manifest = _read_manifest(directory)
            _check_against_live(manifest, opt, names, scheduler)
        except CheckpointError as exc:
            error = str(exc)
        error = _agree(error)
        if error is not None or manifest is None:
            raise CheckpointError(error or "another process could not read the checkpoint")
        params = {names[id(p)]: p for group in opt.param_groups for p in group["params"]}
        targets = {
            key: torch.empty_like(params[plan.name].detach(), dtype=plan.dtype)
            for key, plan in manifest.tensors.items()
        }
        try:
            _read_tensors(manifest, targets)
            if _read_manifest_doc(directory).get("checkpoint_id") != manifest.checkpoint_id:
                raise CheckpointError(f"{directory}: the checkpoint changed while loading")
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:  # DCP wraps failures of any rank; all ranks report one error
            error = (
                f"{manifest.shard_dir}: reading the shards failed ({type(exc).__name__}: {str(exc)[:300]})"
            )
        error = _agree(error)
        if error is not None:
            raise CheckpointError(error)
    finally:
        _close(manifest)
    _apply(manifest, opt, params, targets, scheduler)
    logger.debug("loaded sharded optimizer state from %s", directory)


def _apply(
    manifest: _Manifest,
    opt: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    scheduler: Any,
) -> None:
    """Install the loaded state, hyperparameters and scheduler position (validated), or change nothing."""
    state: dict[str, dict[str, Any]] = {}
    for name, record in manifest.doc["state"].items():
        param = params[name]
        state[name] = {}
        for state_key, entry in record.items():
            if "sharded" in entry:
                state[name][state_key] = targets[entry["sharded"]]
            else:
                value = _restore_value(entry["value"], None, state_key)
                if isinstance(value, torch.Tensor) and _keeps_step_on_device(opt, param):
                    value = value.to(param.device)
                state[name][state_key] = value
    groups = [
        {k: _restore_value(v, live[k], k) for k, v in saved["hyperparameters"].items()}
        for saved, live in zip(manifest.doc["param_groups"], opt.param_groups, strict=True)
    ]
    with _rollback(opt, scheduler):
        # As Optimizer.load_state_dict does, minus its copies: the targets already have their final placement.
        opt.state.clear()
        opt.state.update({params[name]: entries for name, entries in state.items()})
        for live, hyper in zip(opt.param_groups, groups, strict=True):
            live.update(hyper)
        if scheduler is not None:
            inner = unwrap_scheduler(scheduler)
            inner.load_state_dict(
                _restore_value(manifest.doc["scheduler"]["state_dict"], inner.state_dict(), "scheduler")
            )


# ---------------------------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedStateInfo:
    """What a sharded checkpoint holds, read without torch.distributed or a model."""

    directory: str
    checkpoint_id: str
    optimizer_class: str | None
    world_size: int | None
    num_shards: int
    parameters: dict[str, dict[str, tuple[int, ...]]]  # name -> state key -> global shape
    has_scheduler: bool


def inspect_sharded_state(directory: str | os.PathLike[str]) -> ShardedStateInfo:
    """Describe a sharded checkpoint (validated like a load): parameters, global shapes, number of shards."""
    manifest = _read_manifest(os.fspath(directory))
    _close(manifest)
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for plan in manifest.tensors.values():
        params.setdefault(plan.name, {})[plan.state_key] = plan.shape
    opt = manifest.doc.get("optimizer")
    world = manifest.doc.get("world_size")
    return ShardedStateInfo(
        directory=manifest.directory,
        checkpoint_id=manifest.checkpoint_id,
        optimizer_class=opt.get("class")
        if isinstance(opt, dict) and isinstance(opt.get("class"), str)
        else None,
        world_size=world if isinstance(world, int) and not isinstance(world, bool) else None,
        num_shards=len(manifest.doc["shards"]["files"]),
        parameters=params,
        has_scheduler=isinstance(manifest.doc.get("scheduler"), dict),
    )


def full_state_tensors(directory: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each sharded state tensor as a full tensor, one at a time (consolidation without torch.distributed)."""
    manifest = _read_manifest(os.fspath(directory))
    try:
        for key, plan in manifest.tensors.items():
            full = torch.empty(plan.shape, dtype=plan.dtype)
            for chunk in plan.chunks:
                label = os.path.join(manifest.shard_dir, chunk.file)
                with safe_open(_fd_path(manifest.fds[chunk.file], label), "pt", backend="pread") as f:
                    region = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
                    full[region] = f.get_slice(key)[:]
            yield key, full
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{manifest.shard_dir}: cannot read the shards ({exc})") from None
    finally:
        _close(manifest)
