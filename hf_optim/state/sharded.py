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
from hf_optim.state.checks import check_hyperparameters, check_param_state, check_same_structure
from hf_optim.state.codec import Encoder, decode
from hf_optim.state.format import dtype_name, parse_json
from hf_optim.state.io import OpenFile, checkpoint_roots, open_file, read_json

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


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _distributed() else 0


def agree(error: str | None) -> str | None:
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


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (no pickling)."""
    if not _distributed():
        return text
    data = text.encode() if rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return bytes(buf.tolist()).decode()


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by torchrun and accelerate; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _distributed() else 0


def _broadcast_id() -> str:
    """A new checkpoint id, chosen by rank 0 and known to every rank (no pickling)."""
    raw = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.uint8)
    if _distributed():
        dist.broadcast(raw, src=0)
    return bytes(raw.tolist()).hex()


def barrier() -> None:
    """A barrier over the default process group (nothing without one)."""
    if _distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
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


def place_like_parameters(
    opt: torch.optim.Optimizer, state_dict: dict[str, Any], saved_values: dict[int, dict[str, Any]]
) -> None:
    """Turn full state tensors of ``DTensor`` parameters into ``DTensor``s placed like them (each process
    keeps its own part: no communication), in a torch-format ``state_dict`` about to be loaded into ``opt``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    for index, entries in state_dict["state"].items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if not isinstance(param, DTensor):
            continue
        for key, value in list(entries.items()):
            if (
                isinstance(value, torch.Tensor)
                and not isinstance(value, DTensor)
                and value.shape == param.shape
            ):
                placed = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                entries[key] = placed
                if index in saved_values and key in saved_values[index]:
                    saved_values[index][key] = placed


def _encode(value: Any, key: str, where: str) -> Any:
    """``value`` as JSON through the state codec (tuples, dicts, registered objects keep their types); a
    one-element tensor (``step``) as ``{"scalar": x, "dtype": d}``. Other tensors are refused: they go to the
    shards, not to the manifest."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not _is_dtensor(value):
        if value.dtype not in _DTYPES.values():
            raise ValueError(f"{where}: a scalar of dtype {value.dtype} cannot be saved")
        return {"scalar": value.item(), "dtype": dtype_name(value.dtype)}
    enc = Encoder()
    node = enc.encode(value, key, where)
    if enc.tensors:
        raise ValueError(
            f"{where}: tensors inside hyperparameters or scheduler state cannot be saved sharded"
        )
    return node


def _decode(node: Any, where: str) -> Any:
    if isinstance(node, dict) and set(node) == {"scalar", "dtype"}:
        number, dtype = node["scalar"], _DTYPES.get(node["dtype"]) if isinstance(node["dtype"], str) else None
        if dtype is None or isinstance(number, bool) or not isinstance(number, int | float):
            raise CheckpointError(f"{where}: bad scalar {str(node)[:100]}")
        return torch.tensor(number, dtype=dtype)
    return decode(node, {}, where)


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
    names = parameter_names(model, opt)
    checkpoint_id = _broadcast_id()
    shard_dir = f"optimizer-shards-{checkpoint_id}"

    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    state: dict[str, dict[str, Any]] = {}
    for g, group in enumerate(opt.param_groups):
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append(
            {
                "params": [names[id(p)] for p in group["params"]],
                "hyperparameters": _encode(hyper, f"param_groups.{g}", f"param_groups[{g}]"),
            }
        )
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
                    record[key] = {
                        "value": _encode(value, f"state.{name}.{key}", f"state[{name!r}][{key!r}]")
                    }
            state[name] = record
    scheduler_state = None
    if scheduler is not None:
        inner = unwrap_scheduler(scheduler)
        scheduler_state = {
            "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "config": getattr(inner, "hf_optim_config", None),
            "state_dict": _encode(inner.state_dict(), "scheduler", "scheduler.state_dict()"),
        }

    if rank() == 0:
        os.makedirs(directory, exist_ok=True)
    barrier()
    tmp_dir = os.path.join(directory, f".{shard_dir}.tmp")
    error = None
    try:
        writer = _StreamingWriter(
            tmp_dir, fqn_to_index_mapping=_file_buckets(tensors, max_file_size), save_distributed=True
        )
        dcp.save(tensors, storage_writer=writer)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    error = agree(error)
    if error is not None:
        raise OSError(f"saving sharded optimizer state to {directory!r} failed: {error}")

    manifest_path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    if rank() == 0:
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
    barrier()
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
    files: dict[str, OpenFile]  # shard file name -> the open file whose header was checked (see _close)


def _close(manifest: _Manifest | None) -> None:
    for f in manifest.files.values() if manifest is not None else ():
        f.close()


def _open(path: str, directory: str) -> OpenFile:
    """A checked, open file of the checkpoint (regular, resolving inside it or its Hub cache blobs)."""
    try:
        return open_file(path, roots=checkpoint_roots(directory))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None


def _read_manifest_doc(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    f = _open(path, directory)
    try:
        doc = read_json(f)
    finally:
        f.close()
    if not isinstance(doc, dict) or doc.get("format") != _KIND:
        raise CheckpointError(f"{path}: not a sharded hf_optim checkpoint")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format version {version!r}")
    return doc


def sharded_manifest_files(path: str) -> list[str]:
    """The files a sharded manifest references (relative paths, itself first): to download exactly them."""
    directory = os.path.dirname(path)
    doc = _read_manifest_doc(directory)
    shards = doc.get("shards")
    checkpoint_id = doc.get("checkpoint_id")
    folder = shards.get("folder") if isinstance(shards, dict) else None
    files = shards.get("files") if isinstance(shards, dict) else None
    if (
        not isinstance(checkpoint_id, str)
        or folder != f"optimizer-shards-{checkpoint_id}"
        or not _SHARD_DIR_RE.match(folder)
        or not isinstance(files, list)
        or not all(isinstance(f, str) and _SHARD_FILE_RE.match(f) for f in files)
    ):
        raise CheckpointError(f"{path}: malformed 'shards'")
    return [SHARDED_MANIFEST_NAME, *(f"{folder}/{name}" for name in files)]


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
    opened: dict[str, OpenFile] = {}
    try:
        for name in files:
            label = os.path.join(shard_dir, name)
            opened[name] = _open(label, directory)
            _read_shard_header(label, opened[name], expected, chunks)
        plans = {}
        for key, (shape, dtype, name, state_key) in expected.items():
            _check_tiling(key, shape, chunks[key], shard_dir)
            plans[key] = _TensorPlan(key, name, state_key, shape, dtype, tuple(chunks[key]))
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return _Manifest(directory, checkpoint_id, shard_dir, doc, plans, opened)


def _read_shard_header(
    label: str, file: OpenFile, expected: Mapping[str, tuple[Any, ...]], chunks: dict[str, list[_Chunk]]
) -> None:
    """Check one shard file's header (tensor names, dtypes, DCP offsets) and record its chunks."""
    try:
        with safe_open(file.reader_path(), "pt", backend="pread") as f:
            info_raw = (f.metadata() or {}).get(_DCP_INFO_KEY)
            info = parse_json(info_raw.encode(), f"{label}: {_DCP_INFO_KEY}") if info_raw else None
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
            with safe_open(self._manifest.files[name].reader_path(), "pt", backend="pread") as f:
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


@dataclass(frozen=True)
class _Checked:
    """What the manifest says, decoded and checked against the live objects (nothing applied yet)."""

    groups: list[dict[str, Any]]  # hyperparameters to apply, group by group
    values: dict[str, dict[str, Any]]  # non-tensor state by parameter name
    scheduler_state: dict[str, Any] | None


def _check_against_live(
    manifest: _Manifest, opt: torch.optim.Optimizer, names: Mapping[int, str], scheduler: Any
) -> _Checked:
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    groups = manifest.doc.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise CheckpointError(
            f"{path}: {len(groups) if isinstance(groups, list) else '?'} param groups saved, "
            f"the optimizer has {len(opt.param_groups)}"
        )
    params: dict[str, torch.Tensor] = {}
    checked_groups = []
    for g, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        where = f"{path}: param_groups[{g}]"
        if not isinstance(saved, dict) or set(saved) != {"params", "hyperparameters"}:
            raise CheckpointError(f"{where} is malformed")
        if saved["params"] != [names[id(p)] for p in live["params"]]:
            raise CheckpointError(f"{where} holds other parameters than the optimizer's group {g}")
        params.update({names[id(p)]: p for p in live["params"]})
        hyper = _decode(saved["hyperparameters"], where)
        if not isinstance(hyper, dict) or _RESERVED & set(hyper):
            raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
        live_hyper = {k: v for k, v in live.items() if k not in ("params", "param_names")}
        missing = sorted(set(live_hyper) - set(hyper))
        if missing:
            raise CheckpointError(f"{where}: hyperparameters {missing} are missing")
        checked_groups.append(check_hyperparameters(opt, g, hyper, live_hyper, where, strict=True, notes=[]))
    values: dict[str, dict[str, Any]] = {}
    for name, record in manifest.doc["state"].items():
        if name not in params:
            raise CheckpointError(f"{path}: state for {name!r}, which is not a parameter of the optimizer")
        decoded: dict[str, Any] = {}
        for state_key, entry in record.items():
            where = f"{path}: state[{name!r}][{state_key!r}]"
            if "value" in entry:
                decoded[state_key] = values.setdefault(name, {})[state_key] = _decode(entry["value"], where)
            else:
                plan = manifest.tensors[entry["sharded"]]
                decoded[state_key] = torch.empty(
                    plan.shape, dtype=plan.dtype, device="meta"
                )  # shape, dtype only
        check_param_state(name, decoded, params[name], opt.state.get(params[name]), path)
    for plan in manifest.tensors.values():
        if plan.shape != tuple(params[plan.name].shape):
            raise CheckpointError(
                f"{path}: {plan.key} has global shape {list(plan.shape)}, parameter {plan.name!r} has "
                f"{list(params[plan.name].shape)}"
            )
    scheduler_state = None
    if scheduler is not None:
        saved_sched = manifest.doc.get("scheduler")
        if not isinstance(saved_sched, dict) or "state_dict" not in saved_sched:
            raise CheckpointError(f"{path}: no scheduler state saved")
        scheduler_state = _decode(saved_sched["state_dict"], f"{path}: scheduler")
        check_same_structure(scheduler_state, unwrap_scheduler(scheduler).state_dict(), f"{path}: scheduler")
    return _Checked(checked_groups, values, scheduler_state)


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
) -> tuple[str, list[str]]:
    """Restore state saved by :func:`save_sharded_state` into an FSDP2 or a plain model's optimizer.

    Works on any number of processes (resharding), including one process with a plain model. Every rank
    validates the whole checkpoint against its live objects first, and all ranks raise together if any of them
    finds a problem, leaving every optimizer and scheduler unchanged. Returns the checkpoint id and the names of
    the parameters whose state was restored.
    """
    directory = os.fspath(directory)
    opt = unwrap_optimizer(optimizer)
    names = parameter_names(model, opt)
    manifest: _Manifest | None = None
    try:
        error = checked = None
        try:
            manifest = _read_manifest(directory)
            checked = _check_against_live(manifest, opt, names, scheduler)
        except CheckpointError as exc:
            error = str(exc)
        error = agree(error)
        if error is not None or manifest is None or checked is None:
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
        error = agree(error)
        if error is not None:
            raise CheckpointError(error)
    finally:
        _close(manifest)
    _apply(manifest, checked, opt, params, targets, scheduler)
    logger.debug("loaded sharded optimizer state from %s", directory)
    return manifest.checkpoint_id, list(manifest.doc["state"])


def _apply(
    manifest: _Manifest,
    checked: _Checked,
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
                value = checked.values[name][state_key]
                if isinstance(value, torch.Tensor) and _keeps_step_on_device(opt, param):
                    value = value.to(param.device)
                state[name][state_key] = value
    with _rollback(opt, scheduler):
        # As Optimizer.load_state_dict does, minus its copies: the targets already have their final placement.
        opt.state.clear()
        opt.state.update({params[name]: entries for name, entries in state.items()})
        for live, hyper in zip(opt.param_groups, checked.groups, strict=True):
            live.update(hyper)
        if scheduler is not None:
            unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(checked.scheduler_state))


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


@dataclass(frozen=True)
class ConsolidatedState:
    """A sharded checkpoint as one torch-format optimizer state dict with full tensors, plus its scheduler."""

    state_dict: dict[str, Any]
    param_shapes: list[list[list[int]]]
    optimizer_class: str | None
    scheduler_state: dict[str, Any] | None
    scheduler_class: str | None
    scheduler_name: str | None
    scheduler_kwargs: Any


def consolidated_state(directory: str | os.PathLike[str]) -> ConsolidatedState:
    """Read a sharded checkpoint into full tensors in one process, without torch.distributed (validated as a
    load is: every chunk read through the descriptor whose header was checked)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    manifest = _read_manifest(directory)
    try:
        full: dict[str, torch.Tensor] = {}
        for key, plan in manifest.tensors.items():
            tensor = torch.empty(plan.shape, dtype=plan.dtype)
            for chunk in plan.chunks:
                with safe_open(manifest.files[chunk.file].reader_path(), "pt", backend="pread") as f:
                    region = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
                    tensor[region] = f.get_slice(key)[:]
            full[key] = tensor
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{manifest.shard_dir}: cannot read the shards ({exc})") from None
    finally:
        _close(manifest)
    doc = manifest.doc
    groups, shapes, state = [], [], {}
    index = 0
    for g, saved in enumerate(doc.get("param_groups") or []):
        where = f"{path}: param_groups[{g}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise CheckpointError(f"{where} is malformed")
        hyper = _decode(saved.get("hyperparameters"), where)
        if not isinstance(hyper, dict) or _RESERVED & set(hyper):
            raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
        names = saved["params"]
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: parameter names must be strings")
        groups.append({**hyper, "params": list(range(index, index + len(names))), "param_names": list(names)})
        group_shapes = []
        for name in names:
            record = doc["state"].get(name)
            entries: dict[str, Any] = {}
            shape = None
            for key, entry in (record or {}).items():
                if "sharded" in entry:
                    entries[key] = full[entry["sharded"]]
                    shape = list(entries[key].shape)
                else:
                    entries[key] = _decode(entry["value"], f"{path}: state[{name!r}][{key!r}]")
            if entries:
                state[index] = entries
            group_shapes.append(shape)
            index += 1
        shapes.append(group_shapes)
    sched = doc.get("scheduler") if isinstance(doc.get("scheduler"), dict) else None
    config = sched.get("config") if sched is not None and isinstance(sched.get("config"), dict) else {}
    opt = doc.get("optimizer")
    return ConsolidatedState(
        state_dict={"state": state, "param_groups": groups},
        param_shapes=shapes,
        optimizer_class=opt.get("class")
        if isinstance(opt, dict) and isinstance(opt.get("class"), str)
        else None,
        scheduler_state=_decode(sched["state_dict"], f"{path}: scheduler") if sched is not None else None,
        scheduler_class=sched.get("class")
        if sched is not None and isinstance(sched.get("class"), str)
        else None,
        scheduler_name=config.get("name") if isinstance(config.get("name"), str) else None,
        scheduler_kwargs=config.get("kwargs") if isinstance(config.get("kwargs"), dict) else None,
    )
