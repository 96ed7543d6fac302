"""The v1 layout's constants and the checks every file's metadata passes (``docs/FORMAT.md``).

File names, format kinds and version, the reserved key names, safe file names, dtype names, ``max_shard_size``
parsing and a hardened JSON parser (duplicate keys, nesting depth and huge numbers refused).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from huggingface_hub.serialization._base import parse_size_to_int

from hf_optim.errors import CheckpointError

__all__ = [
    "ACCUMULATOR_NAME",
    "FORMAT_VERSION",
    "KIND_ACCUMULATOR",
    "KIND_OBJECT",
    "KIND_OPTIMIZER",
    "KIND_SCHEDULER",
    "KIND_SHARD",
    "LOCK_NAME",
    "MAX_JSON_DEPTH",
    "METADATA_KEY",
    "OPTIMIZER_INDEX_NAME",
    "OPTIMIZER_NAME",
    "OPTIMIZER_SHARD_PATTERN",
    "RESERVED_KEYS",
    "SCHEDULER_NAME",
    "check_metadata",
    "dtype_from_name",
    "dtype_name",
    "is_safe_name",
    "is_shape",
    "parse_json",
    "parse_max_shard_size",
    "qualname",
]

OPTIMIZER_NAME = "optimizer.safetensors"
"""The file of an unsharded optimizer state (tensors, with the JSON metadata in its header)."""
OPTIMIZER_INDEX_NAME = "optimizer.safetensors.index.json"
"""The index of a state split into several files by ``max_shard_size`` (tensor name -> file)."""
OPTIMIZER_SHARD_PATTERN = "optimizer{suffix}.safetensors"
SCHEDULER_NAME = "scheduler.json"
"""The scheduler's state and its ``hf_optim_config`` (name and arguments), as JSON."""
ACCUMULATOR_NAME = "accumulator.safetensors"
"""The :class:`~hf_optim.GradientAccumulator`'s gradients and counters."""
LOCK_NAME = ".hf_optim.lock"

#: Version of the on-disk layout written here (``docs/FORMAT.md``). Readers accept versions <= this.
FORMAT_VERSION = 1
KIND_OPTIMIZER = "hf_optim.optimizer"
KIND_SHARD = "hf_optim.optimizer_shard"
KIND_SCHEDULER = "hf_optim.scheduler"
KIND_ACCUMULATOR = "hf_optim.accumulator"
KIND_OBJECT = "hf_optim.object"
#: key in safetensors ``__metadata__`` / the index's ``metadata`` holding hf_optim's JSON
METADATA_KEY = "hf_optim"

#: names torch gives meaning to inside ``optimizer.state_dict()``: never a hyperparameter or an ``extra`` entry
RESERVED_KEYS = frozenset({"params", "param_names", "state", "param_groups"})
#: deepest nesting of JSON arrays / objects accepted in a checkpoint
MAX_JSON_DEPTH = 64
#: most values (containers and leaves, a value reached twice counted twice) in one saved value tree: a small
#: pickle of shared lists (``x = [x, x]`` 34 times) unfolds into 2**34 of them
MAX_VALUE_NODES = 1_000_000


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def qualname(obj: Any) -> str:
    """Module-qualified class name of ``obj``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def is_safe_name(name: Any) -> bool:
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


#: the size above which a checkpoint (or each process's part of a sharded one) is split into several files
DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_max_shard_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (huggingface_hub's units) or ``"2GiB"``."""
    message = (
        f"max_shard_size must be an int (bytes) or a string like '5GB', '500MB' or '2GiB', got {value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(message)
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])iB\s*", value, flags=re.IGNORECASE)
        if m is not None:
            size = int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2).upper()) + 1))
        else:
            try:
                size = parse_size_to_int(value)
            except ValueError:
                raise ValueError(message) from None
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: one JSON string (escapes included; an unterminated one runs to the end), matched in a single linear pass
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def _too_deep(text: str) -> bool:
    """Whether arrays / objects nest deeper than :data:`MAX_JSON_DEPTH`: strings are removed in one left-to-right
    pass (each character is read once, so an unterminated string costs no more than a closed one), then the
    remaining brackets are counted."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if len(brackets) <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def parse_json(raw: str | bytes, label: str) -> Any:
    """Parse JSON from a checkpoint: bytes must be UTF-8 without a byte-order mark (``json.loads`` would also
    guess UTF-16 / UTF-32, whose bytes hide brackets from a byte-level count); duplicate keys, NaN/Infinity
    literals, nesting deeper than :data:`MAX_JSON_DEPTH` and integers beyond Python's digit limit are a
    :class:`CheckpointError` naming ``label`` (never a ``RecursionError``)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        if data.startswith(_BOMS) or b"\0" in data[:4]:
            raise CheckpointError(f"{label} is not UTF-8 JSON (byte-order mark or UTF-16/UTF-32 text)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{label} is not UTF-8 JSON: {err}") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise TypeError(f"parse_json expects str or bytes, got {type(raw).__name__}")
    if text.startswith("\ufeff"):
        raise CheckpointError(f"{label} is not UTF-8 JSON (byte-order mark)")
    if _too_deep(text):
        raise CheckpointError(f"{label}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise CheckpointError(
            f"{label}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    except ValueError as err:  # JSONDecodeError, int digit limit, duplicates
        raise CheckpointError(f"{label} is truncated or corrupted: {err}") from None
    return value


def check_metadata(raw: Any, label: str, kind: str) -> dict[str, Any]:
    """Parse hf_optim's metadata (a str in safetensors metadata, an object in the index) and check its version."""
    if raw is None:
        raise CheckpointError(f"{label} is not an hf_optim state file (no {METADATA_KEY!r} metadata)")
    if isinstance(raw, str):
        raw = parse_json(raw, f"{label}: {METADATA_KEY!r} metadata")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{label}: corrupted {METADATA_KEY!r} metadata")
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
