"""Optimizer, scheduler and gradient-accumulator state in safetensors + JSON: no pickle anywhere.

``save_state`` writes ``optimizer.safetensors`` (or shards plus ``optimizer.safetensors.index.json``),
``scheduler.json`` and ``accumulator.safetensors``; ``load_state`` validates a checkpoint completely against the
live objects before it touches any of them. The file layout is specified in ``docs/FORMAT.md``.

Why not ``torch.save``: unpickling a file from an untrusted Hub repository can run arbitrary code. Everything
here is read from safetensors headers, raw tensor bytes and JSON.

Saving is atomic per directory: every file is written under a temporary name and renamed into place, the file
that defines the checkpoint (``optimizer.safetensors`` or the index) last, so a process killed mid-save leaves
the previous checkpoint loadable. Each file records the checkpoint's id; ``load_state`` refuses a mix.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import numbers
import os
import re
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open

from hf_optim._utils import unwrap_optimizer as _unwrap_optimizer
from hf_optim._utils import unwrap_scheduler as _unwrap_scheduler
from hf_optim.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "ACCUMULATOR_NAME",
    "FORMAT_VERSION",
    "OPTIMIZER_INDEX_NAME",
    "OPTIMIZER_NAME",
    "SCHEDULER_NAME",
    "CheckpointError",
    "LoadReport",
    "StateInfo",
    "has_state",
    "inspect_state",
    "load_state",
    "save_state",
]

OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_INDEX_NAME = "optimizer.safetensors.index.json"
OPTIMIZER_SHARD_PATTERN = "optimizer{suffix}.safetensors"
SCHEDULER_NAME = "scheduler.json"
ACCUMULATOR_NAME = "accumulator.safetensors"

#: Version of the on-disk layout written by this module (``docs/FORMAT.md``). Readers accept versions <= this.
FORMAT_VERSION = 1
_KIND_OPTIMIZER = "hf_optim.optimizer"
_KIND_SHARD = "hf_optim.optimizer_shard"
_KIND_SCHEDULER = "hf_optim.scheduler"
_KIND_ACCUMULATOR = "hf_optim.accumulator"
_METADATA_KEY = "hf_optim"  # key in safetensors ``__metadata__`` / the index's ``metadata`` holding our JSON

_TMP_RE = re.compile(r"^\..+\.hf_optim-[0-9a-f]{32}\.tmp$")
_PREV_SUFFIX = ".hf_optim-prev"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

# safetensors dtype codes (the format's spelling) <-> torch dtypes
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------------------------
# Values <-> JSON + tensors ("value tree", docs/FORMAT.md section "Values")
# ---------------------------------------------------------------------------------------------------------------


class _Encoder:
    """Turns nested Python values into JSON, moving tensors into ``self.tensors`` under dotted keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, key: str, value: torch.Tensor, where: str, python: str | None = None) -> dict[str, Any]:
        if key in self.tensors:
            raise ValueError(
                f"{where}: two values map to the same tensor name {key!r} (parameter names and state keys "
                "joined with '.' collide); rename the parameters"
            )
        if value.layout != torch.strided:
            raise ValueError(f"{where}: only dense tensors can be saved, got layout {value.layout}")
        if value.dtype not in _TORCH_TO_ST:
            raise ValueError(f"{where}: tensors of dtype {value.dtype} cannot be stored in safetensors")
        self.tensors[key] = value.detach()
        node: dict[str, Any] = {"tensor": key, "dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
        if python is not None:
            node["python"] = python
        return node

    def encode(self, value: Any, key: str, where: str, *, numbers_as_tensors: bool = False) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(key, value, where)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            value = int(value)
            if numbers_as_tensors and -(2**63) <= value < 2**63:
                return self.tensor(key, torch.tensor(value, dtype=torch.int64), where, python="int")
            return value
        if isinstance(value, numbers.Real):
            value = float(value)
            if numbers_as_tensors:
                return self.tensor(key, torch.tensor(value, dtype=torch.float64), where, python="float")
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v, f"{key}.{i}", where) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{key}.{i}", where) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                return {"dict": {k: self.encode(v, f"{key}.{k}", where) for k, v in value.items()}}
            items = []
            for i, (k, v) in enumerate(value.items()):
                if isinstance(k, torch.Tensor):
                    raise ValueError(f"{where}: tensors cannot be dictionary keys")
                items.append([self.encode(k, f"{key}.{i}.key", where), self.encode(v, f"{key}.{i}", where)])
            return {"items": items}
        raise ValueError(
            f"{where}: values of type {type(value).__module__}.{type(value).__qualname__} cannot be saved "
            "(supported: tensors, numbers, bool, str, None, and lists/tuples/dicts of them)"
        )


def _tensor_refs(node: Any) -> Iterable[dict[str, Any]]:
    """Every tensor node inside an encoded value, following the encoding's tags as :func:`_decode` does.

    Pass encoded values only: a mapping keyed by parameter names, state keys or hyperparameter names (any of which
    may be ``"tensor"``) is not one; wrap it as ``{"dict": mapping}``.
    """
    if isinstance(node, list):
        for item in node:
            yield from _tensor_refs(item)
    elif isinstance(node, dict):
        if "tensor" in node:
            yield node
        elif len(node) == 1:
            ((tag, inner),) = node.items()
            if tag == "dict" and isinstance(inner, dict):
                yield from _tensor_refs(list(inner.values()))
            elif tag in ("tuple", "items") and isinstance(inner, list):
                yield from _tensor_refs(inner)


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """Inverse of :meth:`_Encoder.encode`; ``tensors`` holds the already loaded referenced tensors."""
    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, list):
        return [_decode(item, tensors, where) for item in node]
    if isinstance(node, dict):
        if "tensor" in node:
            key = node["tensor"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"{where}: tensor {key!r} is not in the file(s)")
            value = tensors[key]
            python = node.get("python")  # None, "int" or "float" (checked by _check_tensor_nodes)
            if python is None or not isinstance(value, torch.Tensor):  # not a tensor: a display placeholder
                return value
            return int(value.item()) if python == "int" else float(value.item())
        if len(node) == 1:
            ((tag, inner),) = node.items()
            if tag == "tuple" and isinstance(inner, list):
                return tuple(_decode(item, tensors, where) for item in inner)
            if tag == "dict" and isinstance(inner, dict):
                return {k: _decode(v, tensors, where) for k, v in inner.items()}
            if tag == "items" and isinstance(inner, list):
                out = {}
                for pair in inner:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise CheckpointError(f"{where}: malformed dictionary item {pair!r}")
                    key = _decode(pair[0], tensors, where)
                    try:
                        out[key] = _decode(pair[1], tensors, where)
                    except TypeError:
                        raise CheckpointError(f"{where}: unhashable dictionary key {pair[0]!r}") from None
                return out
            if tag == "float" and inner in ("nan", "inf", "-inf"):
                return float(inner)
    raise CheckpointError(f"{where}: cannot decode value {node!r}")


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


# the tensors that hold a Python number of optimizer state (docs/FORMAT.md "Values")
_PYTHON_NUMBERS = {"int": torch.int64, "float": torch.float64}


def _check_tensor_nodes(node: Any, headers: Mapping[str, _TensorEntry], where: str) -> None:
    """Each referenced tensor exists in the files with the dtype and shape the metadata records."""
    for ref in _tensor_refs(node):
        key = ref["tensor"]
        entry = headers.get(key) if isinstance(key, str) else None
        if entry is None:
            raise CheckpointError(
                f"{where}: tensor {key!r} is listed in the metadata but is not in the file(s)"
            )
        dtype = _dtype_from_name(ref.get("dtype"), f"{where}: tensor {key!r}")
        shape = ref.get("shape")
        if not _is_shape(shape):
            raise CheckpointError(f"{where}: tensor {key!r} has a malformed shape {shape!r} in the metadata")
        if dtype != entry.dtype or shape != list(entry.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} is {_dtype_name(entry.dtype)} {list(entry.shape)} in {entry.file} but "
                f"the metadata says {ref.get('dtype')} {shape}"
            )
        python = ref.get("python")
        if python is not None and (
            not isinstance(python, str) or _PYTHON_NUMBERS.get(python) != dtype or shape != []
        ):
            raise CheckpointError(
                f"{where}: tensor {key!r} ({ref.get('dtype')} {shape}) cannot hold a Python {python!r} "
                "(an int is a 0-d int64 tensor, a float a 0-d float64 tensor)"
            )


# ---------------------------------------------------------------------------------------------------------------
# safetensors files: written directly (header + raw bytes, zero copies), read with validation
# ---------------------------------------------------------------------------------------------------------------


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order (a view, no copy, for contiguous CPU tensors)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _write_safetensors(
    path: str, items: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str], *, fsync: bool
) -> None:
    """Write a safetensors file: 8-byte little-endian header size, JSON header (space-padded to 8 bytes), data.

    Equivalent to ``safetensors.torch.save_file`` (which reads the result; tested) but streams each tensor's
    memory to the file without an intermediate copy, which is what makes saving faster than ``torch.save``.
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("hf_optim writes safetensors only on little-endian machines")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _TORCH_TO_ST[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f:
        written = flushed = _write_all(f, struct.pack("<Q", len(raw)) + raw)
        for _, tensor in items:
            data = _as_bytes(tensor)
            for start in range(0, len(data), _WRITEBACK_CHUNK):
                written += _write_all(f, data[start : start + _WRITEBACK_CHUNK])
                if fsync and written - flushed >= _WRITEBACK_CHUNK:
                    # let the disk start on what is written while we write the rest: fsync then waits less
                    _start_writeback(f.fileno(), flushed, written - flushed)
                    flushed = written
        if fsync:
            os.fsync(f.fileno())


def _write_all(f: Any, data: bytes | memoryview) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += f.write(view[done:])
    return done


_WRITEBACK_CHUNK = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux ``sync_file_range(2)`` (starts writeback of a byte range without waiting), if available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class _TensorEntry:
    file: str  # path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class _SafetensorsFile:
    path: str
    metadata: dict[str, str]
    entries: dict[str, _TensorEntry]


def _open_safetensors(path: str, label: str) -> _SafetensorsFile:
    """Parse and validate a safetensors file's header (the ``safetensors`` library checks it first)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{label}: no such file {path}")
    try:
        with safe_open(path, framework="pt") as f:
            library_keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{label} ({path}) is truncated or corrupted: {err}") from None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{label} ({path}) is truncated or corrupted: bad header size {n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{label} ({path}) has a corrupted header: {err}") from None
    metadata = header.pop("__metadata__", None) or {}
    if set(header) != library_keys or not isinstance(metadata, dict):
        raise CheckpointError(f"{label} ({path}) has a corrupted header")
    entries = {}
    for key, info in header.items():
        try:
            dtype = _ST_TO_TORCH[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{label} ({path}): unsupported or malformed entry for tensor {key!r}"
            ) from None
        entries[key] = _TensorEntry(path, dtype, shape, 8 + n + start, end - start)
    return _SafetensorsFile(path, metadata, entries)


def _read_tensor(fd: int, entry: _TensorEntry, label: str) -> torch.Tensor:
    """Read one tensor's bytes straight into a new CPU tensor (no intermediate copy)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes == 0:
        return out
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < entry.nbytes:
        n = os.preadv(fd, [view[done:]], entry.offset + done)
        if n <= 0:
            raise CheckpointError(f"{label} ({entry.file}) is truncated")
        done += n
    return out


def _read_tensors(entries: Mapping[str, _TensorEntry], label: str) -> dict[str, torch.Tensor]:
    """Read the given tensors, file by file in offset order."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, _TensorEntry]]] = {}
    for key, entry in entries.items():
        by_file.setdefault(entry.file, []).append((key, entry))
    for path, items in by_file.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            for key, entry in sorted(items, key=lambda kv: kv[1].offset):
                out[key] = _read_tensor(fd, entry, label)
        finally:
            os.close(fd)
    return out


def _load_json_metadata(raw: Any, label: str, kind: str) -> dict[str, Any]:
    """Parse our metadata JSON (a str in safetensors metadata, an object in the index) and check its version."""
    if raw is None:
        raise CheckpointError(f"{label} is not an hf_optim state file (no {_METADATA_KEY!r} metadata)")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{label}: corrupted {_METADATA_KEY!r} metadata: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{label}: corrupted {_METADATA_KEY!r} metadata")
    if raw.get("format") != kind:
        raise CheckpointError(f"{label}: expected format {kind!r}, found {raw.get('format')!r}")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{label}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{label}: unknown format version {version} (this hf_optim reads versions <= {FORMAT_VERSION}; "
            "upgrade hf_optim)"
        )
    if not isinstance(raw.get("checkpoint_id"), str):
        raise CheckpointError(f"{label}: metadata has no checkpoint_id")
    return raw


# ---------------------------------------------------------------------------------------------------------------
# Building what to save
# ---------------------------------------------------------------------------------------------------------------


def _registry_name(optimizer: torch.optim.Optimizer) -> str | None:
    from hf_optim.registry import optimizer_name  # the registry imports optimizers: import late

    return optimizer_name(optimizer)


@dataclass
class _ParamRecord:
    index: int
    name: str | None
    shape: list[int] | None
    dtype: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "shape": self.shape, "dtype": self.dtype}
        if self.name is not None:
            out["name"] = self.name
        return out


def _optimizer_payload(
    state_dict: Mapping[str, Any],
    params: Sequence[Sequence[_ParamRecord]],
    *,
    optimizer_class: str | None,
    optimizer_name: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer ``state_dict`` into tensors + the JSON metadata (docs/FORMAT.md)."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("optimizer.state_dict() must have 'state' and 'param_groups' (torch format)")
    groups = state_dict["param_groups"]
    all_records = [r for group in params for r in group]
    names = [r.name for r in all_records]
    keyed_by = "name" if all_records and all(n is not None for n in names) else "index"
    if keyed_by == "name" and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        logger.warning("parameter name %r appears twice; keying the optimizer state by index instead", dup)
        keyed_by = "index"
    key_of = {r.index: (r.name if keyed_by == "name" else str(r.index)) for r in all_records}

    enc = _Encoder()
    group_meta = []
    for g, (group, records) in enumerate(zip(groups, params, strict=True)):
        hyper = {}
        for k, v in group.items():
            if k in ("params", "param_names"):
                continue
            if not isinstance(k, str):
                raise ValueError(f"param group {g}: hyperparameter names must be strings, got {k!r}")
            hyper[k] = enc.encode(v, f"param_groups.{g}.{k}", f"param group {g} hyperparameter {k!r}")
        group_meta.append({"params": [r.to_json() for r in records], "hyperparameters": hyper})

    state_meta: dict[str, Any] = {}
    for index, pstate in state_dict["state"].items():
        if index not in key_of:
            raise ValueError(f"optimizer state has an entry {index!r} that belongs to no parameter group")
        pkey = key_of[index]
        where = f"state of parameter {pkey!r}"
        if not isinstance(pstate, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(pstate).__name__}")
        node = {}
        for k, v in pstate.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: state keys must be strings, got {k!r}")
            node[k] = enc.encode(v, f"state.{pkey}.{k}", f"{where}, key {k!r}", numbers_as_tensors=True)
        state_meta[pkey] = node

    extra = {}
    for k, v in state_dict.items():
        if k in ("state", "param_groups"):
            continue
        if not isinstance(k, str):
            raise ValueError(f"optimizer.state_dict() has a non-string top-level key {k!r}")
        extra[k] = enc.encode(v, f"extra.{k}", f"optimizer.state_dict()[{k!r}]")

    meta = {
        "format": _KIND_OPTIMIZER,
        "format_version": FORMAT_VERSION,
        "optimizer": {"class": optimizer_class, "name": optimizer_name},
        "keyed_by": keyed_by,
        "param_groups": group_meta,
        "state": state_meta,
        "extra": extra,
        "versions": {"hf_optim": _version(), "torch": torch.__version__},
    }
    return enc.tensors, meta


def _version() -> str:
    from hf_optim import __version__

    return __version__


def _live_params(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> list[list[_ParamRecord]]:
    """Index, name, shape and dtype of every parameter, group by group, as ``state_dict`` numbers them."""
    out = []
    for group, sd_group in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        names = sd_group.get("param_names") or group.get("param_names")
        records = []
        for j, (p, index) in enumerate(zip(group["params"], sd_group["params"], strict=True)):
            name = names[j] if names is not None and j < len(names) else None
            records.append(_ParamRecord(int(index), name, list(p.shape), _dtype_name(p.dtype)))
        out.append(records)
    return out


def _scheduler_document(scheduler: Any) -> dict[str, Any]:
    inner = _unwrap_scheduler(scheduler)
    if not callable(getattr(inner, "state_dict", None)):
        raise ValueError(f"scheduler must have a state_dict() method, got {type(scheduler).__name__}")
    config = getattr(inner, "hf_optim_config", None)
    name = config.get("name") if isinstance(config, Mapping) else None
    kwargs = config.get("kwargs") if isinstance(config, Mapping) else None
    return _scheduler_document_from_state(inner.state_dict(), _qualname(inner), name, kwargs)


def _scheduler_document_from_state(
    state: Mapping[str, Any], class_name: str | None, name: str | None, kwargs: Any
) -> dict[str, Any]:
    """The content of ``scheduler.json`` (without the checkpoint id) for a scheduler ``state_dict``."""
    enc = _Encoder()
    state_node = enc.encode(state, "state", "scheduler.state_dict()")
    kwargs_node = enc.encode(kwargs, "kwargs", "scheduler.hf_optim_config['kwargs']")
    if enc.tensors:
        raise ValueError(
            f"scheduler.state_dict() holds tensors ({', '.join(enc.tensors)}); scheduler.json stores JSON only"
        )
    return {
        "format": _KIND_SCHEDULER,
        "format_version": FORMAT_VERSION,
        "class": class_name,
        "name": name,
        "kwargs": kwargs_node,
        "state_dict": state_node,
    }


def _accumulator_payload(accumulator: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not callable(getattr(accumulator, "state_dict", None)):
        raise ValueError(f"accumulator must have a state_dict() method, got {type(accumulator).__name__}")
    enc = _Encoder()
    state = enc.encode(accumulator.state_dict(), "state", "accumulator.state_dict()")
    meta = {
        "format": _KIND_ACCUMULATOR,
        "format_version": FORMAT_VERSION,
        "class": _qualname(accumulator),
        "state": state,
    }
    return enc.tensors, meta


def _parse_max_shard_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", value, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(
                f"max_shard_size must be an int (bytes) or a string like '5GB', '500MB' or '2GiB', got {value!r}"
            )
        unit = m.group(2).upper()
        base = 1024 if "I" in unit else 1000
        size = int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1))
    else:
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {value!r}")
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Atomic writing of a checkpoint directory
# ---------------------------------------------------------------------------------------------------------------


def _prev_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_PREV_SUFFIX}")


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _file_checkpoint_id(path: str) -> str | None:
    """The checkpoint id recorded in one of our files (JSON or safetensors, told apart by content), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:1] == b"{":  # scheduler.json or the index
                doc = json.loads(head + f.read())
                if "weight_map" in doc:
                    doc = doc["metadata"][_METADATA_KEY]
                return doc["checkpoint_id"]
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                return None
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"][_METADATA_KEY])["checkpoint_id"]
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


@dataclass
class _Existing:
    """The checkpoint currently in a directory (as far as its manifest says): id and the files it uses."""

    checkpoint_id: str
    files: set[str]


def _existing_checkpoint(directory: str) -> _Existing | None:
    index = os.path.join(directory, OPTIMIZER_INDEX_NAME)
    single = os.path.join(directory, OPTIMIZER_NAME)
    try:
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                doc = json.load(f)
            meta = doc["metadata"][_METADATA_KEY]
            files = {OPTIMIZER_INDEX_NAME, *doc["weight_map"].values()}
        elif os.path.exists(single):
            with safe_open(single, framework="pt") as f:
                meta = json.loads(f.metadata()[_METADATA_KEY])
            files = {OPTIMIZER_NAME}
        else:
            return None
        for name in (meta.get("files") or {}).values():
            if isinstance(name, str):
                files.add(name)
        return _Existing(meta["checkpoint_id"], {f for f in files if _safe_name(f)})
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def _safe_name(name: Any) -> bool:
    """A plain file name inside the checkpoint directory (no separators, not '.', '..', absolute or hidden)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )


@dataclass
class _PendingFile:
    name: str
    write: Callable[[str], None]  # writes the complete file at the given (temporary) path


def _commit(
    directory: str, checkpoint_id: str, companions: list[_PendingFile], manifest: _PendingFile, fsync: bool
) -> list[str]:
    """Write files under temporary names, then rename: companions first, the manifest last (docs/FORMAT.md)."""
    os.makedirs(directory, exist_ok=True)
    for entry in os.listdir(directory):  # leftovers of saves that were killed
        if _TMP_RE.match(entry):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))
    old = _existing_checkpoint(directory)
    temps: dict[str, str] = {}
    try:
        for pending in [*companions, manifest]:
            tmp = os.path.join(directory, f".{pending.name}.hf_optim-{checkpoint_id}.tmp")
            temps[pending.name] = tmp
            pending.write(tmp)
        for pending in companions:
            final = os.path.join(directory, pending.name)
            if (
                old is not None
                and pending.name in old.files
                and _file_checkpoint_id(final) == old.checkpoint_id
            ):
                os.replace(final, _prev_path(final))  # the previous checkpoint can still find it there
            os.replace(temps[pending.name], final)
            del temps[pending.name]
        index_path = os.path.join(directory, OPTIMIZER_INDEX_NAME)
        os.replace(temps[manifest.name], os.path.join(directory, manifest.name))
        del temps[manifest.name]
        if manifest.name == OPTIMIZER_NAME and os.path.exists(index_path):
            # an index takes precedence over optimizer.safetensors: retiring it is the commit point
            os.replace(index_path, _prev_path(index_path))
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
    if fsync:
        _fsync_directory(directory)

    # The new checkpoint is in place: drop recovery copies and files only the previous checkpoint used.
    written = {p.name for p in [*companions, manifest]}
    stale = set(old.files) - written if old is not None else set()
    for name in [*written, OPTIMIZER_INDEX_NAME, *stale]:
        prev = _prev_path(os.path.join(directory, name))
        if os.path.exists(prev):
            os.remove(prev)
    for name in stale:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and _file_checkpoint_id(path) == old.checkpoint_id:  # type: ignore[union-attr]
            os.remove(path)
    return [os.path.join(directory, name) for name in [*(p.name for p in companions), manifest.name]]


# ---------------------------------------------------------------------------------------------------------------
# save_state
# ---------------------------------------------------------------------------------------------------------------


def save_state(
    save_directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    max_shard_size: int | str = "5GB",
    fsync: bool = False,
) -> list[str]:
    """Save optimizer (and scheduler / gradient-accumulator) state to ``save_directory``; returns the file paths.

    Writes ``optimizer.safetensors`` (or ``optimizer-0000i-of-0000N.safetensors`` shards plus
    ``optimizer.safetensors.index.json`` when the state exceeds ``max_shard_size``), ``scheduler.json`` and
    ``accumulator.safetensors``. State is keyed by parameter name when the optimizer was given named parameters.
    Works with any ``torch.optim.Optimizer`` whose state holds tensors and numbers.

    The directory is updated atomically: a process killed mid-save leaves the previous checkpoint loadable (the
    page cache outlives the process). ``fsync=True`` also flushes every file and the directory to the disk, so
    the checkpoint survives a power loss too, at the cost of waiting for the disk; transformers and Accelerate
    do not fsync their checkpoints either. In multi-process training call this from one process only.
    """
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_directory {directory!r} exists and is not a directory")
    shard_size = _parse_max_shard_size(max_shard_size)
    opt = _unwrap_optimizer(optimizer)
    state_dict = opt.state_dict()
    tensors, meta = _optimizer_payload(
        state_dict,
        _live_params(opt, state_dict),
        optimizer_class=_qualname(opt),
        optimizer_name=_registry_name(opt),
    )
    scheduler_doc = _scheduler_document(scheduler) if scheduler is not None else None
    accumulator_payload = _accumulator_payload(accumulator) if accumulator is not None else None
    return _save_payload(
        directory,
        tensors,
        meta,
        scheduler_doc=scheduler_doc,
        accumulator_payload=accumulator_payload,
        shard_size=shard_size,
        fsync=fsync,
    )


def _write_json(path: str, doc: Any, *, fsync: bool) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _save_payload(
    directory: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    scheduler_doc: dict[str, Any] | None,
    accumulator_payload: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    shard_size: int,
    fsync: bool,
) -> list[str]:
    checkpoint_id = uuid.uuid4().hex
    meta = {**meta, "checkpoint_id": checkpoint_id}
    meta["files"] = {
        "scheduler": SCHEDULER_NAME if scheduler_doc is not None else None,
        "accumulator": ACCUMULATOR_NAME if accumulator_payload is not None else None,
    }
    companions: list[_PendingFile] = []

    if scheduler_doc is not None:
        doc = {**scheduler_doc, "checkpoint_id": checkpoint_id}

        def write_scheduler(path: str, doc: dict[str, Any] = doc) -> None:
            _write_json(path, doc, fsync=fsync)

        companions.append(_PendingFile(SCHEDULER_NAME, write_scheduler))

    if accumulator_payload is not None:
        acc_tensors, acc_meta = accumulator_payload
        acc_meta = {**acc_meta, "checkpoint_id": checkpoint_id}
        acc_md = {"format": "pt", _METADATA_KEY: json.dumps(acc_meta, allow_nan=False)}

        def write_accumulator(path: str) -> None:
            _write_safetensors(path, list(acc_tensors.items()), acc_md, fsync=fsync)

        companions.append(_PendingFile(ACCUMULATOR_NAME, write_accumulator))

    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern=OPTIMIZER_SHARD_PATTERN,
        max_shard_size=shard_size,
    )
    shards = split.filename_to_tensors if tensors else {OPTIMIZER_NAME: []}
    if len(shards) == 1:
        md = {"format": "pt", _METADATA_KEY: json.dumps(meta, allow_nan=False)}
        items = [(k, tensors[k]) for k in next(iter(shards.values()))]

        def write_single(path: str) -> None:
            _write_safetensors(path, items, md, fsync=fsync)

        manifest = _PendingFile(OPTIMIZER_NAME, write_single)
    else:
        for shard_name, keys in shards.items():
            shard_meta = {
                "format": _KIND_SHARD,
                "format_version": FORMAT_VERSION,
                "checkpoint_id": checkpoint_id,
                "shard": shard_name,
            }
            shard_md = {"format": "pt", _METADATA_KEY: json.dumps(shard_meta)}
            shard_items = [(k, tensors[k]) for k in keys]

            def write_shard(path: str, items: list = shard_items, md: dict = shard_md) -> None:
                _write_safetensors(path, items, md, fsync=fsync)

            companions.append(_PendingFile(shard_name, write_shard))
        index = {
            "metadata": {"total_size": split.metadata["total_size"], _METADATA_KEY: meta},
            "weight_map": {k: split.tensor_to_filename[k] for k in tensors},
        }

        def write_index(path: str) -> None:
            _write_json(path, index, fsync=fsync)

        manifest = _PendingFile(OPTIMIZER_INDEX_NAME, write_index)
    written = _commit(directory, checkpoint_id, companions, manifest, fsync)
    logger.info("saved optimizer state to %s (%d file(s))", directory, len(written))
    return written


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory (structure only: headers, metadata, ids)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    directory: str
    manifest: str  # file name
    meta: dict[str, Any]
    entries: dict[str, _TensorEntry]  # optimizer tensors by key
    files: list[str]  # paths actually read

    @property
    def checkpoint_id(self) -> str:
        return self.meta["checkpoint_id"]

    def companion(self, kind: str) -> str | None:
        """Path of the scheduler / accumulator file of this checkpoint (a recovery copy if need be)."""
        name = (self.meta.get("files") or {}).get(kind)
        if name is None:
            return None
        if not _safe_name(name):
            raise CheckpointError(f"{self.manifest}: file name {name!r} would leave the checkpoint directory")
        return _resolve_member(self.directory, name, self.checkpoint_id, self.manifest)


def _resolve_member(directory: str, name: str, checkpoint_id: str, manifest: str) -> str:
    """``name`` in ``directory`` if it belongs to ``checkpoint_id``, else its recovery copy from an interrupted save."""
    path = os.path.join(directory, name)
    if not os.path.exists(path) and not os.path.exists(_prev_path(path)):
        raise FileNotFoundError(f"{name} is listed by {manifest} but missing from {directory}")
    for candidate in (path, _prev_path(path)):
        if os.path.exists(candidate) and _file_checkpoint_id(candidate) == checkpoint_id:
            return candidate
    if os.path.exists(path) and _file_checkpoint_id(path) is None:
        raise CheckpointError(
            f"{name} in {directory} is truncated or corrupted (its metadata cannot be read)"
        )
    raise CheckpointError(
        f"{name} in {directory} does not belong to the checkpoint described by {manifest} (different checkpoint "
        "id): the directory holds an incomplete save or files from different saves"
    )


def _read_json(path: str, label: str) -> Any:
    """Parse one of the checkpoint's JSON files (the index, ``scheduler.json``)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{label} in {os.path.dirname(path)} is truncated or corrupted: {err}"
        ) from None


def _read_checkpoint(directory: str) -> _Checkpoint:
    index_path = os.path.join(directory, OPTIMIZER_INDEX_NAME)
    single_path = os.path.join(directory, OPTIMIZER_NAME)
    if os.path.isfile(index_path):
        index = _read_json(index_path, OPTIMIZER_INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
            raise CheckpointError(f"{OPTIMIZER_INDEX_NAME} in {directory} has no 'metadata'")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{OPTIMIZER_INDEX_NAME} in {directory} has no 'weight_map'")
        meta = _load_json_metadata(
            index["metadata"].get(_METADATA_KEY), OPTIMIZER_INDEX_NAME, _KIND_OPTIMIZER
        )
        for name in weight_map.values():
            if not _safe_name(name) or not name.endswith(".safetensors"):
                raise CheckpointError(
                    f"{OPTIMIZER_INDEX_NAME}: shard name {name!r} would leave the checkpoint directory "
                    "(expected a plain *.safetensors file name)"
                )
        shard_names = sorted(set(weight_map.values()))
        entries: dict[str, _TensorEntry] = {}
        files = [index_path]
        for name in shard_names:
            path = _resolve_member(directory, name, meta["checkpoint_id"], OPTIMIZER_INDEX_NAME)
            shard = _open_safetensors(path, name)
            # its checkpoint id is the index's: _resolve_member read it from this same metadata
            _load_json_metadata(shard.metadata.get(_METADATA_KEY), name, _KIND_SHARD)
            expected = {k for k, v in weight_map.items() if v == name}
            if set(shard.entries) != expected:
                extra = sorted(set(shard.entries) - expected)[:3]
                missing = sorted(expected - set(shard.entries))[:3]
                raise CheckpointError(
                    f"{name} does not hold the tensors {OPTIMIZER_INDEX_NAME} maps to it (missing {missing}, "
                    f"unexpected {extra})"
                )
            entries.update(shard.entries)
            files.append(path)
        manifest = OPTIMIZER_INDEX_NAME
    elif os.path.isfile(single_path):
        single = _open_safetensors(single_path, OPTIMIZER_NAME)
        meta = _load_json_metadata(single.metadata.get(_METADATA_KEY), OPTIMIZER_NAME, _KIND_OPTIMIZER)
        entries = dict(single.entries)
        files = [single_path]
        manifest = OPTIMIZER_NAME
    else:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no such checkpoint directory: {directory}")
        raise FileNotFoundError(
            f"no optimizer state in {directory}: expected {OPTIMIZER_NAME} or {OPTIMIZER_INDEX_NAME}"
        )
    _validate_optimizer_meta(meta, entries, manifest)
    return _Checkpoint(directory, manifest, meta, entries, files)


def _encoded_values(meta: Mapping[str, Any], state_keys: Iterable[str], *, groups: bool) -> list[Any]:
    """The optimizer metadata's encoded values: the state of ``state_keys``, the hyperparameters, ``extra``."""
    nodes = [{"dict": meta["state"][k]} for k in state_keys if k in meta["state"]]
    if groups:
        nodes += [{"dict": g["hyperparameters"]} for g in meta["param_groups"]]
    nodes.append({"dict": meta.get("extra") or {}})
    return nodes


def _validate_optimizer_meta(meta: dict[str, Any], entries: Mapping[str, _TensorEntry], label: str) -> None:
    """Check the metadata's structure and types, so that readers can rely on them (docs/FORMAT.md)."""
    groups = meta.get("param_groups")
    state = meta.get("state")
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or meta.get("keyed_by") not in ("name", "index")
    ):
        raise CheckpointError(f"{label}: metadata lacks param_groups / state / keyed_by")
    optimizer = meta.get("optimizer")
    if optimizer is not None and not (
        isinstance(optimizer, dict)
        and all(optimizer.get(k) is None or isinstance(optimizer[k], str) for k in ("class", "name"))
    ):
        raise CheckpointError(f"{label}: malformed metadata: 'optimizer' is {optimizer!r}")
    for key in ("extra", "files"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{label}: malformed metadata: {key!r} is {meta[key]!r}, not an object")
    keys: set[str] = set()
    for g, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{label}: param group {g} is malformed")
        if not isinstance(group.get("hyperparameters"), dict):
            raise CheckpointError(f"{label}: param group {g} has no hyperparameters")
        for rec in group["params"]:
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
                raise CheckpointError(f"{label}: param group {g} has a malformed parameter record {rec!r}")
            key = rec.get("name") if meta["keyed_by"] == "name" else str(rec["index"])
            if not isinstance(key, str) or key in keys:
                raise CheckpointError(f"{label}: parameter {key!r} is missing a name or listed twice")
            if not (rec.get("shape") is None or _is_shape(rec["shape"])) or not (
                rec.get("dtype") is None or isinstance(rec["dtype"], str)
            ):
                raise CheckpointError(f"{label}: parameter {key!r} has a malformed shape or dtype in {rec!r}")
            keys.add(key)
    unknown = sorted(set(state) - keys)
    if unknown:
        raise CheckpointError(f"{label}: state for parameter {unknown[0]!r}, which is in no param group")
    for key, pstate in state.items():
        if not isinstance(pstate, dict):
            raise CheckpointError(
                f"{label}: malformed metadata: the state of parameter {key!r} is {pstate!r}"
            )
    tree = _encoded_values(meta, state, groups=True)
    _check_tensor_nodes(tree, entries, label)
    referenced = {ref["tensor"] for ref in _tensor_refs(tree)}
    unreferenced = sorted(set(entries) - referenced)
    if unreferenced:
        raise CheckpointError(f"{label}: tensor {unreferenced[0]!r} is in the file but not in the metadata")


# ---------------------------------------------------------------------------------------------------------------
# load_state
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state` restored and what it skipped (with ``strict=False``)."""

    source: str  #: local directory the checkpoint was read from
    checkpoint_id: str
    loaded: tuple[str, ...] = ()  #: parameters whose optimizer state was restored (names, or indices as str)
    missing: tuple[str, ...] = ()  #: optimizer parameters the checkpoint has no record of
    unexpected: tuple[str, ...] = ()  #: checkpoint parameters the optimizer does not have
    #: present on both sides but skipped: a different parameter shape, or saved state whose keys or tensor
    #: shapes differ from the state the optimizer already has for the parameter (that state is kept)
    mismatched: tuple[str, ...] = ()
    param_groups_restored: bool = False
    scheduler_loaded: bool = False
    accumulator_loaded: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    scheduler_skipped: bool = False  #: a scheduler was passed but its state was not loaded (see ``notes``)
    accumulator_skipped: bool = False  #: an accumulator was passed but its state was not loaded

    @property
    def complete(self) -> bool:
        """True when nothing was skipped."""
        return (
            not (self.missing or self.unexpected or self.mismatched)
            and self.param_groups_restored
            and not (self.scheduler_skipped or self.accumulator_skipped)
        )


@dataclass
class _Live:
    index: int
    name: str | None
    param: torch.Tensor
    group: int

    @property
    def key(self) -> str:
        return self.name if self.name is not None else str(self.index)


def _fail(errors: list[str], strict: bool, notes: list[str], message: str) -> None:
    (errors if strict else notes).append(message)


def _raise(errors: list[str], source: str) -> None:
    if errors:
        shown = "".join(f"\n  - {e}" for e in errors[:8])
        more = f"\n  (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise ValueError(f"cannot load the optimizer state from {source}:{shown}{more}")


def _plan_optimizer(
    ckpt: _Checkpoint, opt: torch.optim.Optimizer, live_sd: Mapping[str, Any], strict: bool, notes: list[str]
) -> tuple[dict[int, str], bool, dict[str, list[str]]]:
    """Match checkpoint parameters to live ones; returns (live index -> saved key, restore groups?, report lists)."""
    meta = ckpt.meta
    errors: list[str] = []
    saved_class = (meta.get("optimizer") or {}).get("class")
    if saved_class is not None and saved_class != _qualname(opt):
        _fail(errors, strict, notes, f"the state was saved from {saved_class}, not {_qualname(opt)}")
    saved_groups = meta["param_groups"]
    live_groups = live_sd["param_groups"]
    live: list[list[_Live]] = []
    for g, (group, sd_group) in enumerate(zip(opt.param_groups, live_groups, strict=True)):
        names = sd_group.get("param_names")
        live.append(
            [
                _Live(int(i), names[j] if names else None, p, g)
                for j, (p, i) in enumerate(zip(group["params"], sd_group["params"], strict=True))
            ]
        )
    flat_live = [p for group in live for p in group]
    by_name = meta["keyed_by"] == "name" and all(p.name is not None for p in flat_live)
    saved_records = [
        (g, rec, rec["name"] if meta["keyed_by"] == "name" else str(rec["index"]))
        for g, group in enumerate(saved_groups)
        for rec in group["params"]
    ]
    same_structure = len(saved_groups) == len(live) and all(
        len(sg["params"]) == len(lg) for sg, lg in zip(saved_groups, live, strict=True)
    )
    if len(saved_groups) != len(live):
        _fail(
            errors,
            strict,
            notes,
            f"the checkpoint has {len(saved_groups)} parameter group(s), the optimizer {len(live)}",
        )

    pairs: list[tuple[_Live, str, dict[str, Any], int]] = []  # live, saved key, saved record, saved group
    missing: list[str] = []
    unexpected: list[str] = []
    if by_name:
        saved_by_name = {key: (g, rec) for g, rec, key in saved_records}
        live_names = {p.name for p in flat_live}
        for p in flat_live:
            if p.name in saved_by_name:
                g, rec = saved_by_name[p.name]
                if g != p.group:
                    _fail(
                        errors,
                        strict,
                        notes,
                        f"parameter {p.name!r} is in param group {g} of the checkpoint but group {p.group} now",
                    )
                pairs.append((p, p.name, rec, g))
            else:
                missing.append(p.name)  # type: ignore[arg-type]
        unexpected = [key for _, _, key in saved_records if key not in live_names]
    elif same_structure:
        for g, (sg, lg) in enumerate(zip(saved_groups, live, strict=True)):
            for rec, p in zip(sg["params"], lg, strict=True):
                key = rec["name"] if meta["keyed_by"] == "name" else str(rec["index"])
                pairs.append((p, key, rec, g))
        if meta["keyed_by"] == "name" and not any(p.name for p in flat_live):
            notes.append("the optimizer has no parameter names: parameters matched by position")
    else:
        sizes = [len(g["params"]) for g in saved_groups]
        live_sizes = [len(g) for g in live]
        _fail(
            errors,
            strict,
            notes,
            f"parameter groups have sizes {sizes} in the checkpoint but {live_sizes} in the optimizer, and "
            "parameters cannot be matched by name",
        )
        missing = [p.key for p in flat_live]
        unexpected = [key for _, _, key in saved_records]
    if missing:
        _fail(
            errors,
            strict,
            notes,
            f"optimizer parameter(s) missing from the checkpoint: {', '.join(map(repr, missing[:5]))}"
            + (" ..." if len(missing) > 5 else ""),
        )
    if unexpected:
        _fail(
            errors,
            strict,
            notes,
            f"checkpoint parameter(s) the optimizer does not have: {', '.join(map(repr, unexpected[:5]))}"
            + (" ..." if len(unexpected) > 5 else ""),
        )

    plan: dict[int, str] = {}
    mismatched: list[str] = []
    state_meta = meta["state"]
    for p, key, rec, _g in pairs:
        shape = rec.get("shape")
        if shape is not None and list(shape) != list(p.param.shape):
            mismatched.append(key)
            _fail(
                errors,
                strict,
                notes,
                f"parameter {key!r} has shape {tuple(shape)} in the checkpoint but {tuple(p.param.shape)} in the "
                "optimizer",
            )
            continue
        dtype = rec.get("dtype")
        if dtype is not None and dtype != _dtype_name(p.param.dtype):
            _fail(
                errors,
                strict,
                notes,
                f"parameter {key!r} is {dtype} in the checkpoint but {_dtype_name(p.param.dtype)} in the optimizer",
            )
        # if the live optimizer already has state for this parameter, the saved one must look alike
        live_state = live_sd["state"].get(p.index)
        saved_state = state_meta.get(key)
        if live_state and saved_state is not None:
            differences = []
            if set(live_state) != set(saved_state):
                differences.append(
                    f"state of parameter {key!r} has keys {sorted(saved_state)} in the checkpoint but "
                    f"{sorted(live_state)} in the optimizer"
                )
            for k, node in saved_state.items():
                value = live_state.get(k)
                if (
                    isinstance(value, torch.Tensor)
                    and isinstance(node, dict)
                    and "tensor" in node
                    and node["shape"] != list(value.shape)
                ):
                    differences.append(
                        f"state {k!r} of parameter {key!r} has shape {tuple(node['shape'])} in the checkpoint "
                        f"but {tuple(value.shape)} in the optimizer"
                    )
            if differences:
                mismatched.append(key)
                for message in differences:
                    _fail(errors, strict, notes, message)
                continue
        plan[p.index] = key
    _raise(errors, ckpt.directory)
    lists = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    return plan, len(saved_groups) == len(live), lists


def _read_scheduler(ckpt: _Checkpoint) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """``scheduler.json`` of the checkpoint: (path, validated document, decoded state dict), or None."""
    path = ckpt.companion("scheduler")
    if path is None:
        return None
    doc = _load_json_metadata(_read_json(path, SCHEDULER_NAME), SCHEDULER_NAME, _KIND_SCHEDULER)
    # companion() matched the id _file_checkpoint_id found, which for a JSON document with a "weight_map" is
    # the index's metadata one: compare the scheduler's own
    if doc["checkpoint_id"] != ckpt.checkpoint_id:
        raise CheckpointError(
            f"{SCHEDULER_NAME} in {ckpt.directory} records checkpoint id {doc['checkpoint_id']!r}, not "
            f"{ckpt.checkpoint_id!r} like {ckpt.manifest}"
        )
    state = _decode(doc.get("state_dict"), {}, SCHEDULER_NAME)
    if not isinstance(state, dict):
        raise CheckpointError(f"{SCHEDULER_NAME}: state_dict is not a dictionary")
    return path, doc, state


def _scheduler_state(
    ckpt: _Checkpoint, scheduler: Any, opt: torch.optim.Optimizer, strict: bool, notes: list[str]
) -> dict[str, Any] | None:
    errors: list[str] = []
    saved = _read_scheduler(ckpt)
    if saved is None:
        _fail(errors, strict, notes, f"the checkpoint has no {SCHEDULER_NAME} but a scheduler was given")
        _raise(errors, ckpt.directory)
        return None
    _path, doc, state = saved
    notes_before = len(notes)
    inner = _unwrap_scheduler(scheduler)
    saved_class = doc.get("class")
    if saved_class is not None and saved_class != _qualname(inner):
        _fail(errors, strict, notes, f"{SCHEDULER_NAME} was saved from {saved_class}, not {_qualname(inner)}")
    config = getattr(inner, "hf_optim_config", None)
    live_name = config.get("name") if isinstance(config, Mapping) else None
    saved_name = doc.get("name")
    if saved_name is not None and live_name is not None and saved_name != live_name:
        _fail(
            errors,
            strict,
            notes,
            f"{SCHEDULER_NAME} holds schedule {saved_name!r} but the scheduler is {live_name!r}",
        )
    base_lrs = state.get("base_lrs")
    if isinstance(base_lrs, list) and len(base_lrs) != len(opt.param_groups):
        _fail(
            errors,
            strict,
            notes,
            f"{SCHEDULER_NAME} has {len(base_lrs)} learning rates, the optimizer {len(opt.param_groups)} groups",
        )
    _raise(errors, ckpt.directory)
    if len(notes) > notes_before:
        notes.append("scheduler state not loaded")
        return None
    if saved_name is not None and saved_name == live_name:
        saved_kwargs = _decode(doc.get("kwargs"), {}, SCHEDULER_NAME)
        if saved_kwargs != config.get("kwargs"):
            notes.append(
                f"schedule {saved_name!r} was saved with arguments {saved_kwargs}, now {config.get('kwargs')}"
            )
    return state


def _accumulator_state(
    ckpt: _Checkpoint, accumulator: Any, strict: bool, notes: list[str]
) -> dict[str, Any] | None:
    errors: list[str] = []
    path = ckpt.companion("accumulator")
    if path is None:
        _fail(errors, strict, notes, f"the checkpoint has no {ACCUMULATOR_NAME} but an accumulator was given")
        _raise(errors, ckpt.directory)
        return None
    st = _open_safetensors(path, ACCUMULATOR_NAME)
    meta = _load_json_metadata(st.metadata.get(_METADATA_KEY), ACCUMULATOR_NAME, _KIND_ACCUMULATOR)
    notes_before = len(notes)
    _check_tensor_nodes(meta.get("state"), st.entries, ACCUMULATOR_NAME)
    saved_class = meta.get("class")
    if saved_class is not None and saved_class != _qualname(accumulator):
        _fail(
            errors,
            strict,
            notes,
            f"{ACCUMULATOR_NAME} was saved from {saved_class}, not {_qualname(accumulator)}",
        )
    refs = {r["tensor"] for r in _tensor_refs(meta.get("state"))}
    if set(st.entries) != refs:
        raise CheckpointError(f"{ACCUMULATOR_NAME}: the tensors in the file do not match its metadata")
    # compare with the live accumulator's buffers where it has any
    live_state = accumulator.state_dict() if callable(getattr(accumulator, "state_dict", None)) else None
    saved_state = meta.get("state")
    if (
        isinstance(live_state, Mapping)
        and isinstance(saved_state, dict)
        and isinstance(saved_state.get("dict"), dict)
    ):
        saved_grads = saved_state["dict"].get("gradients")
        live_grads = live_state.get("gradients")
        if isinstance(saved_grads, list) and isinstance(live_grads, list) and live_grads:
            if len(saved_grads) != len(live_grads):
                _fail(
                    errors,
                    strict,
                    notes,
                    f"{ACCUMULATOR_NAME} has {len(saved_grads)} gradients, the accumulator {len(live_grads)}",
                )
            else:
                for i, (node, g) in enumerate(zip(saved_grads, live_grads, strict=True)):
                    if (
                        isinstance(g, torch.Tensor)
                        and isinstance(node, dict)
                        and "tensor" in node
                        and list(node["shape"]) != list(g.shape)
                    ):
                        _fail(
                            errors,
                            strict,
                            notes,
                            f"{ACCUMULATOR_NAME}: gradient {i} has shape {tuple(node['shape'])}, the "
                            f"accumulator's {tuple(g.shape)}",
                        )
    _raise(errors, ckpt.directory)
    if len(notes) > notes_before:
        notes.append("accumulator state not loaded")
        return None
    tensors = _read_tensors(st.entries, ACCUMULATOR_NAME)
    return _decode(saved_state, tensors, ACCUMULATOR_NAME)


def load_state(
    path_or_repo_id: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    strict: bool = True,
) -> LoadReport:
    """Restore state saved by :func:`save_state` from a local directory, a Hub repo id or an ``hf://`` URL.

    Everything is validated (format version, files, parameter names, group structure, shapes, dtypes) before the
    optimizer, scheduler or accumulator is touched; on any error they are left exactly as they were. State
    tensors are placed on their parameter's device with their saved dtype; param-group hyperparameters
    (including the lr the schedule had set) and the scheduler's position are restored, so training continues
    bit for bit. With ``strict=False`` the matching part is loaded and the :class:`LoadReport` lists the rest.

    Hub repositories are downloaded with ``huggingface_hub`` into the usual cache (``HF_HUB_OFFLINE=1`` works).
    """
    from hf_optim.hub import resolve_state_dir

    directory = resolve_state_dir(path_or_repo_id, revision=revision, subfolder=subfolder, token=token)
    opt = _unwrap_optimizer(optimizer)
    with _nesting_is_corruption(directory):
        return _load(directory, opt, scheduler, accumulator, strict)


@contextlib.contextmanager
def _nesting_is_corruption(directory: str) -> Iterator[None]:
    """Turn a RecursionError into a CheckpointError: metadata nested too deeply for JSON parsing or decoding.

    Around all of the reading (JSON parsing, validation, and decoding in ``_load`` / ``_inspect``), not only
    the reader: metadata that parses can still be too deep for :func:`_decode`.
    """
    try:
        yield
    except RecursionError:
        raise CheckpointError(f"the metadata in {directory} is nested too deeply (corrupted?)") from None


def _load(
    directory: str, opt: torch.optim.Optimizer, scheduler: Any, accumulator: Any, strict: bool
) -> LoadReport:
    ckpt = _read_checkpoint(directory)
    notes: list[str] = []
    live_sd = opt.state_dict()
    plan, restore_groups, lists = _plan_optimizer(ckpt, opt, live_sd, strict, notes)
    if not restore_groups:
        notes.append("param-group hyperparameters not restored (different number of groups)")
    sched_state = _scheduler_state(ckpt, scheduler, opt, strict, notes) if scheduler is not None else None
    acc_state = _accumulator_state(ckpt, accumulator, strict, notes) if accumulator is not None else None

    # Read the tensors this load needs.
    meta = ckpt.meta
    nodes = _encoded_values(meta, set(plan.values()), groups=restore_groups)
    wanted = {ref["tensor"]: ckpt.entries[ref["tensor"]] for ref in _tensor_refs(nodes)}
    tensors = _read_tensors(wanted, ckpt.manifest)

    # Build the complete new state dict in the live optimizer's numbering.
    new_state: dict[Any, Any] = {}
    saved_values: dict[int, dict[str, Any]] = {}
    for index, pstate in live_sd["state"].items():
        if index not in plan:
            new_state[index] = pstate  # not matched (strict=False): keep what the optimizer had
    for index, key in plan.items():
        if key in meta["state"]:
            value = {k: _decode(v, tensors, f"state of {key!r}") for k, v in meta["state"][key].items()}
            new_state[index] = value
            saved_values[index] = value
    new_groups = []
    for g, live_group in enumerate(live_sd["param_groups"]):
        group = dict(live_group)
        if restore_groups:
            saved = _decode({"dict": meta["param_groups"][g]["hyperparameters"]}, tensors, f"param group {g}")
            added = sorted(set(saved) - set(live_group))
            absent = sorted(set(live_group) - set(saved) - {"params", "param_names"})
            if added:
                notes.append(f"param group {g}: restored hyperparameters the optimizer did not have: {added}")
            if absent:
                notes.append(
                    f"param group {g}: kept the optimizer's values of {absent} (not in the checkpoint)"
                )
            group.update(saved)
        new_groups.append(group)
    new_sd: dict[str, Any] = {"state": new_state, "param_groups": new_groups}
    for k, node in (meta.get("extra") or {}).items():
        new_sd[k] = _decode(node, tensors, f"optimizer.state_dict()[{k!r}]")

    # Apply: optimizer, scheduler, accumulator; roll back on an unexpected failure.
    old_state, old_groups = opt.state, opt.param_groups
    inner_sched = _unwrap_scheduler(scheduler) if scheduler is not None else None
    old_sched = copy.deepcopy(inner_sched.state_dict()) if sched_state is not None else None
    try:
        opt.load_state_dict(new_sd)
        _restore_saved_dtypes(opt, saved_values)
        if sched_state is not None:
            # hf_optim_config describes the live scheduler's function: keep it (the kwargs were compared above)
            inner_sched.load_state_dict(
                {k: copy.deepcopy(v) for k, v in sched_state.items() if k != "hf_optim_config"}
            )
        if acc_state is not None:
            accumulator.load_state_dict(acc_state)
    except BaseException:
        opt.__dict__.update({"state": old_state, "param_groups": old_groups})
        if old_sched is not None:
            inner_sched.load_state_dict(old_sched)
        raise
    for note in notes:
        logger.warning("load_state(%s): %s", directory, note)
    loaded = tuple(plan.values())
    return LoadReport(
        source=directory,
        checkpoint_id=ckpt.checkpoint_id,
        loaded=loaded,
        missing=tuple(lists["missing"]),
        unexpected=tuple(lists["unexpected"]),
        mismatched=tuple(lists["mismatched"]),
        param_groups_restored=restore_groups,
        scheduler_loaded=sched_state is not None,
        accumulator_loaded=acc_state is not None,
        scheduler_skipped=scheduler is not None and sched_state is None,
        accumulator_skipped=accumulator is not None and acc_state is None,
        notes=tuple(notes),
    )


def _restore_saved_dtypes(opt: torch.optim.Optimizer, saved_values: Mapping[int, dict[str, Any]]) -> None:
    """Undo torch's cast of floating state to the parameter dtype: the state keeps the dtype it was saved with."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, values in saved_values.items():
        state = opt.state.get(params[index]) if index < len(params) else None
        if not state:
            continue
        for k, saved in values.items():
            live = state.get(k)
            if (
                k != "step"
                and isinstance(saved, torch.Tensor)
                and isinstance(live, torch.Tensor)
                and live.dtype != saved.dtype
            ):
                state[k] = saved.to(device=live.device)


# ---------------------------------------------------------------------------------------------------------------
# Inspection without a model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateInfo:
    """Summary of a checkpoint read from metadata and tensor headers only (``hf-optim inspect``)."""

    directory: str
    checkpoint_id: str
    format_version: int
    optimizer_class: str | None
    optimizer_name: str | None
    keyed_by: str
    param_groups: tuple[dict[str, Any], ...]  #: per group: num_params, numel, hyperparameters
    num_params: int
    numel: int
    state_bytes: int
    files: tuple[str, ...]
    step: tuple[float, float] | None  #: (min, max) of the per-parameter step counters
    scheduler_name: str | None = None
    scheduler_class: str | None = None
    scheduler_step: int | None = None
    scheduler_lr: tuple[float, ...] | None = None
    accumulator_bytes: int | None = None


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete, consistent hf_optim optimizer checkpoint (headers checked only)."""
    directory = os.fspath(directory)
    try:
        with _nesting_is_corruption(directory):
            ckpt = _read_checkpoint(directory)
            for kind in ("scheduler", "accumulator"):
                ckpt.companion(kind)
    except (OSError, ValueError):
        return False
    return True


def inspect_state(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> StateInfo:
    """Describe a checkpoint without a model or optimizer: reads metadata, headers and the step counters."""
    from hf_optim.hub import resolve_state_dir

    directory = resolve_state_dir(path_or_repo_id, revision=revision, subfolder=subfolder, token=token)
    with _nesting_is_corruption(directory):
        return _inspect(directory)


def _inspect(directory: str) -> StateInfo:
    ckpt = _read_checkpoint(directory)
    meta = ckpt.meta
    groups = []
    total_params = total_numel = 0
    for group in meta["param_groups"]:
        numel = sum(math.prod(rec["shape"]) for rec in group["params"] if rec.get("shape") is not None)
        hyper = _decode({"dict": group["hyperparameters"]}, _PlaceholderTensors(ckpt.entries), "param group")
        groups.append({"num_params": len(group["params"]), "numel": numel, "hyperparameters": hyper})
        total_params += len(group["params"])
        total_numel += numel
    steps = [
        node["step"]
        for node in meta["state"].values()
        if isinstance(node.get("step"), dict) and "tensor" in node["step"]
    ]
    step_range = None
    if steps:
        values = _read_tensors({n["tensor"]: ckpt.entries[n["tensor"]] for n in steps}, ckpt.manifest)
        nums = [float(v.reshape(-1)[0]) for v in values.values() if v.numel() == 1 and not v.is_complex()]
        if nums:
            step_range = (min(nums), max(nums))
    info: dict[str, Any] = {}
    files = list(ckpt.files)
    saved_scheduler = _read_scheduler(ckpt)
    if saved_scheduler is not None:
        sched_path, doc, state = saved_scheduler
        info["scheduler_name"] = doc.get("name")
        info["scheduler_class"] = doc.get("class")
        info["scheduler_step"] = state.get("last_epoch")
        last_lr = state.get("_last_lr")
        if isinstance(last_lr, list):
            info["scheduler_lr"] = tuple(last_lr)
        files.append(sched_path)
    acc_path = ckpt.companion("accumulator")
    if acc_path is not None:
        st = _open_safetensors(acc_path, ACCUMULATOR_NAME)
        info["accumulator_bytes"] = sum(e.nbytes for e in st.entries.values())
        files.append(acc_path)
    return StateInfo(
        directory=directory,
        checkpoint_id=ckpt.checkpoint_id,
        format_version=meta["format_version"],
        optimizer_class=(meta.get("optimizer") or {}).get("class"),
        optimizer_name=(meta.get("optimizer") or {}).get("name"),
        keyed_by=meta["keyed_by"],
        param_groups=tuple(groups),
        num_params=total_params,
        numel=total_numel,
        state_bytes=sum(e.nbytes for e in ckpt.entries.values()),
        files=tuple(files),
        step=step_range,
        **info,
    )


class _PlaceholderTensors(Mapping[str, Any]):
    """Stands in for tensors when decoding for display: ``<tensor float32 []>``."""

    def __init__(self, entries: Mapping[str, _TensorEntry]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> Any:
        e = self._entries[key]
        return f"<tensor {_dtype_name(e.dtype)} {list(e.shape)}>"

    def __iter__(self):  # pragma: no cover - Mapping protocol
        return iter(self._entries)

    def __len__(self) -> int:  # pragma: no cover
        return len(self._entries)
