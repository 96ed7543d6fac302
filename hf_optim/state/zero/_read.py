"""Reading a sharded-family manifest (versions 2 and 3) as element ranges of flattened global tensors, checked.

Version 3 chunks are ranges (``{"file", "range": [start, stop]}``); version 2 chunks are boxes (``{"file",
"offsets", "sizes"}``, FSDP2's row blocks), read as the range they cover when the box spans whole rows. Each
tensor's chunks must tile it exactly; each partition file is opened once, its header checked (this save's id, the
manifest's ranges, dtypes and sizes), and only the byte ranges a process needs are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.codec import decode
from hf_optim.state.io import (
    OpenFile,
    SafetensorsFile,
    checkpoint_roots,
    open_file,
    read_flat_range,
    read_json,
    read_safetensors,
)
from hf_optim.state.zero._format import (
    CHECKPOINT_ID_KEY,
    KIND,
    RANGES_KEY,
    SHARD_FILE_RE,
    SHARDED_MANIFEST_NAME,
    ZERO_FORMAT_VERSION,
    decode_value,
)

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class RangeChunk:
    file: str
    start: int
    stop: int
    sizes: tuple[int, ...] | None  # version 2: the box's shape in the file


@dataclass
class TensorEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[RangeChunk]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    """A checked manifest: groups, per-parameter state (values decoded, tensors as :class:`TensorEntry`)."""

    directory: str
    path: str
    doc: dict[str, Any]
    version: int
    checkpoint_id: str
    folder: str
    files: tuple[str, ...]
    groups: list[tuple[list[str], Any]]  # (parameter names, decoded hyperparameters)
    state: dict[str, dict[str, Any]]  # name -> key -> decoded value | TensorEntry
    master: dict[str, TensorEntry] | None
    scheduler_state: Any = None  # decoded, None when none was saved
    opened: dict[str, SafetensorsFile] = field(default_factory=dict)
    checkpoint: Any = None  # a single-process checkpoint (``reader.Checkpoint``) the tensors are read from
    saved_scheduler: Any = None  # its scheduler as the checkpoint model describes it (model.SavedScheduler)

    def close(self) -> None:
        for st in self.opened.values():
            st.file.close()
        self.opened.clear()
        if self.checkpoint is not None:
            self.checkpoint.close()


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(directory: str) -> Plan:
    """The manifest of ``directory``, every structural rule of ``docs/FORMAT.md`` checked (no data read)."""
    path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    f = _open(path, directory)
    try:
        doc = read_json(f)
    finally:
        f.close()
    if not isinstance(doc, dict) or doc.get("format") != KIND:
        raise CheckpointError(f"{path}: not a sharded hf_optim checkpoint")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > ZERO_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format version {version!r}")
    if version < 2:
        raise CheckpointError(f"{path}: format version {version} is not a sharded layout")
    checkpoint_id, shards = doc.get("checkpoint_id"), doc.get("shards")
    if not isinstance(checkpoint_id, str) or not re.fullmatch(r"[0-9a-f]{32}", checkpoint_id):
        raise CheckpointError(f"{path}: bad checkpoint_id {str(checkpoint_id)[:80]!r}")
    folder = f"optimizer-shards-{checkpoint_id}"
    if not isinstance(shards, dict) or shards.get("folder") != folder:
        raise CheckpointError(f"{path}: the shard folder must be {folder}")
    files = shards.get("files")
    if (
        not isinstance(files, list)
        or not files
        or not all(isinstance(n, str) and SHARD_FILE_RE.fullmatch(n) for n in files)
        or len(set(files)) != len(files)
    ):
        raise CheckpointError(f"{path}: 'shards.files' must list shard-*.safetensors file names")
    raw_groups = doc.get("param_groups")
    if not isinstance(raw_groups, list):
        raise CheckpointError(f"{path}: 'param_groups' must be a list")
    groups = []
    for g, group in enumerate(raw_groups):
        if (
            not isinstance(group, dict)
            or set(group) != {"params", "hyperparameters"}
            or not isinstance(group["params"], list)
            or not all(isinstance(n, str) for n in group["params"])
        ):
            raise CheckpointError(f"{path}: param_groups[{g}] is malformed")
        groups.append((group["params"], decode_value(group["hyperparameters"], f"{path}: param_groups[{g}]")))
    raw_state = doc.get("state")
    if not isinstance(raw_state, dict):
        raise CheckpointError(f"{path}: 'state' must be an object")
    seen: set[str] = set()
    state: dict[str, dict[str, Any]] = {}
    for name, record in raw_state.items():
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: state[{name!r}] must be an object")
        state[name] = {}
        for key, entry in record.items():
            where = f"{path}: state[{name!r}][{key!r}]"
            if isinstance(entry, dict) and set(entry) == {"value"}:
                state[name][key] = decode_value(entry["value"], where)
            else:
                state[name][key] = _tensor_entry(entry, files, version, where, seen)
    master = None
    raw_master = doc.get("master_weights") if version >= 3 else None
    if raw_master is not None:
        if not isinstance(raw_master, dict):
            raise CheckpointError(f"{path}: 'master_weights' must be an object or null")
        master = {
            name: _tensor_entry(entry, files, version, f"{path}: master_weights[{name!r}]", seen)
            for name, entry in raw_master.items()
        }
    saved_scheduler = doc.get("scheduler")
    scheduler_state = None
    if isinstance(saved_scheduler, dict) and "state_dict" in saved_scheduler:
        scheduler_state = decode_value(saved_scheduler["state_dict"], f"{path}: scheduler")
    plan = Plan(directory, path, doc, version, checkpoint_id, folder, tuple(files), groups, state, master)
    plan.scheduler_state = scheduler_state
    return plan


def plan_from_checkpoint(ckpt: Any, scheduler: Any) -> Plan:
    """A single-process checkpoint (format version 1, ``reader.Checkpoint``, already checked; its scheduler as a
    ``model.SavedScheduler`` or None) as a :class:`Plan`: each state tensor is one chunk, read by element ranges
    from its file."""
    meta = ckpt.meta
    if meta.get("keyed_by") != "name":
        raise CheckpointError(
            f"{ckpt.path}: its parameters are unnamed (keyed by index): cannot place them by name"
        )
    scalars = [
        node["tensor"]
        for record in meta["state"].values()
        for node in record.values()
        if isinstance(node, dict) and "tensor" in node and not ckpt.entries[node["tensor"]].shape
    ]
    small = ckpt.read_tensors(scalars)
    groups = []
    for g, group in enumerate(meta["param_groups"]):
        hyper = {
            k: decode(v, {}, f"{ckpt.path}: param_groups[{g}]") for k, v in group["hyperparameters"].items()
        }
        groups.append(([p["name"] for p in group["params"]], hyper))
    state: dict[str, dict[str, Any]] = {}
    for name, record in meta["state"].items():
        state[name] = {}
        for key, node in record.items():
            where = f"{ckpt.path}: state[{name!r}][{key!r}]"
            header = ckpt.entries.get(node["tensor"]) if isinstance(node, dict) and "tensor" in node else None
            if header is not None and header.shape:
                if header.dtype not in DTYPES.values():
                    raise CheckpointError(
                        f"{where}: a state tensor of dtype {header.dtype} cannot be partitioned"
                    )
                numel = math.prod(header.shape)
                chunk = RangeChunk(ckpt.manifest, 0, numel, tuple(header.shape))
                state[name][key] = TensorEntry(node["tensor"], tuple(header.shape), header.dtype, [chunk])
            else:
                state[name][key] = decode(node, small, where)
    plan = Plan(ckpt.directory, ckpt.path, meta, 1, ckpt.checkpoint_id, "", (), groups, state, None)
    plan.checkpoint, plan.saved_scheduler = ckpt, scheduler
    plan.scheduler_state = scheduler.state if scheduler is not None else None
    return plan


def _tensor_entry(entry: Any, files: list[str], version: int, where: str, seen: set[str]) -> TensorEntry:
    if not isinstance(entry, dict) or not {"sharded", "shape", "dtype", "chunks"} <= set(entry):
        raise CheckpointError(f"{where} is malformed")
    key, shape, dtype = entry["sharded"], entry["shape"], DTYPES.get(str(entry["dtype"]))
    if not isinstance(key, str) or key in seen:
        raise CheckpointError(f"{where}: tensor name {str(key)[:80]!r} is not a new string")
    seen.add(key)
    if not isinstance(shape, list) or not all(_int(d) for d in shape) or dtype is None:
        raise CheckpointError(f"{where}: bad shape or dtype")
    chunks_doc = entry["chunks"]
    if not isinstance(chunks_doc, list):
        raise CheckpointError(f"{where}: 'chunks' must be a list")
    numel = math.prod(shape)
    chunks = []
    for c in chunks_doc:
        if not isinstance(c, dict) or c.get("file") not in files:
            raise CheckpointError(f"{where}: a chunk names no listed file")
        if version >= 3 and set(c) == {"file", "range"}:
            rng = c["range"]
            if not (isinstance(rng, list) and len(rng) == 2 and all(_int(v) for v in rng)):
                raise CheckpointError(f"{where}: bad chunk range {str(rng)[:80]}")
            start, stop, sizes = rng[0], rng[1], None
        elif set(c) == {"file", "offsets", "sizes"}:
            offsets, sizes = c["offsets"], c["sizes"]
            if not all(
                isinstance(v, list) and len(v) == len(shape) and all(_int(x) for x in v)
                for v in (offsets, sizes)
            ):
                raise CheckpointError(f"{where}: bad chunk box")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
                raise CheckpointError(f"{where}: chunk {offsets} + {sizes} lies outside the tensor {shape}")
            if math.prod(sizes) == 0:
                continue  # an empty chunk holds no data
            if shape and (any(offsets[1:]) or sizes[1:] != shape[1:]):
                raise CheckpointError(
                    f"{where}: a chunk that is not a block of whole rows: not readable as a range"
                )
            row = math.prod(shape[1:]) if shape else 1
            start = offsets[0] * row if shape else 0
            stop, sizes = start + math.prod(sizes), tuple(sizes)
        else:
            raise CheckpointError(f"{where}: malformed chunk")
        if start > stop or stop > numel:
            raise CheckpointError(
                f"{where}: chunk [{start}, {stop}) lies outside the tensor's {numel} elements"
            )
        if stop > start:
            chunks.append(RangeChunk(c["file"], start, stop, sizes))
    chunks.sort(key=lambda c: c.start)
    position = 0
    for c in chunks:
        if c.start < position:
            raise CheckpointError(f"{where}: chunks overlap at element {c.start} ({c.file})")
        if c.start > position:
            raise CheckpointError(f"{where}: chunks leave elements [{position}, {c.start}) uncovered")
        position = c.stop
    if position != numel:
        raise CheckpointError(f"{where}: chunks leave elements [{position}, {numel}) uncovered")
    if len({c.file for c in chunks}) != len(chunks):
        raise CheckpointError(f"{where}: a file holds two chunks of one tensor")
    return TensorEntry(key, tuple(shape), dtype, chunks)


def _open(path: str, directory: str) -> OpenFile:
    try:
        return open_file(path, roots=checkpoint_roots(directory))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None


def entries(plan: Plan) -> Iterable[TensorEntry]:
    for record in plan.state.values():
        yield from (v for v in record.values() if isinstance(v, TensorEntry))
    yield from (plan.master or {}).values()


def open_files(plan: Plan, names: Iterable[str]) -> None:
    """Open and check the partition files ``names``: this save's, holding exactly the chunks the manifest
    records for them, with its dtypes and sizes."""
    expected: dict[str, dict[str, tuple[TensorEntry, RangeChunk]]] = {}
    for entry in entries(plan):
        for c in entry.chunks:
            expected.setdefault(c.file, {})[entry.key] = (entry, c)
    if plan.checkpoint is not None:
        return
    for name in sorted(set(names) - set(plan.opened)):
        path = os.path.join(plan.directory, plan.folder, name)
        st = read_safetensors(_open(path, plan.directory))
        plan.opened[name] = st
        if st.metadata.get(CHECKPOINT_ID_KEY) != plan.checkpoint_id:
            raise CheckpointError(
                f"{path}: written by another save (its checkpoint id is not the manifest's)"
            )
        records = expected.get(name, {})
        if set(st.entries) != set(records):
            raise CheckpointError(f"{path}: holds other tensors than the manifest records for it")
        ranges = None
        if plan.version >= 3:
            try:
                ranges = json.loads(st.metadata.get(RANGES_KEY, ""))
            except ValueError:
                raise CheckpointError(f"{path}: bad {RANGES_KEY} metadata") from None
        for key, (entry, c) in records.items():
            header = st.entries[key]
            shape = c.sizes if c.sizes is not None else (c.stop - c.start,)
            if header.dtype != entry.dtype or tuple(header.shape) != tuple(shape):
                raise CheckpointError(f"{path}: {key} is not the chunk the manifest records")
            if ranges is not None and c.sizes is None and ranges.get(key) != [c.start, c.stop]:
                raise CheckpointError(f"{path}: {key} holds another range than the manifest records")


def needed_files(entry: TensorEntry, start: int, stop: int) -> set[str]:
    return {c.file for c in entry.chunks if c.start < stop and c.stop > start}


def read_range(
    plan: Plan, entry: TensorEntry, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Elements ``[start, stop)`` of ``entry``'s flattened global tensor, from the (opened) files holding them,
    into ``out`` (contiguous, on the CPU) when given."""
    if plan.checkpoint is not None:
        return plan.checkpoint.read_flat_range(entry.key, start, stop, out)
    out = torch.empty(stop - start, dtype=entry.dtype) if out is None else out
    for c in entry.chunks:
        low, high = max(start, c.start), min(stop, c.stop)
        if low < high:
            read_flat_range(
                plan.opened[c.file], entry.key, low - c.start, high - c.start, out[low - start : high - start]
            )
    return out
