"""The checkpoint model's reader of range-partitioned checkpoints (format version 3; version 2 and single-process
files too, through :mod:`._read`): the manifest decoded into a :class:`~hf_optim.state.model.SavedCheckpoint`, so
that :func:`hf_optim.state.plan.check` checks it like every other layout; then each tensor read by element
ranges: whole, only this process's rows of an FSDP2 parameter, or (:meth:`RangeReader.read_ranges`) only its
elements of ZeRO's partitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state import sharded
from hf_optim.state.model import (
    Chunk,
    SavedAccumulator,
    SavedCheckpoint,
    SavedGroup,
    SavedParam,
    SavedScheduler,
    TensorEntry,
)
from hf_optim.state.sharded import local_region
from hf_optim.state.zero._read import Plan, needed_files, open_files, read_manifest, read_range
from hf_optim.state.zero._read import TensorEntry as RangeEntry

__all__ = ["RangeReader", "region_range"]

RESERVED = frozenset({"params", "param_names", "state", "param_groups"})


def region_range(name: str, p: torch.Tensor) -> tuple[int, int] | None:
    """The elements of ``p``'s flattened global tensor this process holds: all of a plain tensor, the rows of an
    FSDP2 ``DTensor``'s shard (None when it holds none)."""
    region = local_region(p)
    if region is None:
        return 0, p.numel()
    offsets, sizes = region
    if math.prod(sizes) == 0:
        return None
    shape = tuple(p.shape)
    if any(offsets[1:]) or tuple(sizes[1:]) != shape[1:]:
        raise ValueError(
            f"parameter {name!r}: its shard is not a block of whole rows: not loadable by ranges"
        )
    row = math.prod(shape[1:])
    return offsets[0] * row, (offsets[0] + sizes[0]) * row


class RangeReader:
    """Reader of a range-partitioned checkpoint (:class:`~hf_optim.state.model.Reader`). A context manager: it
    closes the partition files."""

    def __init__(self, directory: str, open_plan: Callable[[], Plan] | None = None) -> None:
        self.directory = directory
        self.open_plan = open_plan or (lambda: read_manifest(directory))  # a single-process checkpoint's too
        self.plan: Plan | None = None
        self.entries: dict[str, RangeEntry] = {}

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.plan is not None:
            self.plan.close()

    def describe(self) -> SavedCheckpoint:
        plan = self.plan = self.open_plan()
        self.entries.update({entry.key: entry for entry in (plan.master or {}).values()})
        groups: list[SavedGroup] = []
        seen: set[str] = set()
        for g, (names, hyper) in enumerate(plan.groups):
            if not isinstance(hyper, dict) or RESERVED & set(hyper):
                raise CheckpointError(
                    f"{plan.path}: param_groups[{g}]: hyperparameters must be an object without reserved keys"
                )
            params = []
            for name in names:
                if name in seen:
                    raise CheckpointError(
                        f"{plan.path}: param_groups[{g}]: parameter {name[:200]!r} is listed twice"
                    )
                seen.add(name)
                record = plan.state.get(name)
                state = None if record is None else {k: self._entry(name, v) for k, v in record.items()}
                params.append(SavedParam(key=name, name=name, state=state))
            groups.append(SavedGroup(dict(hyper), params))
        stray = sorted(set(plan.state) - seen)
        if stray:
            raise CheckpointError(f"{plan.path}: state for {stray[0][:200]!r}, which is in no param group")
        return SavedCheckpoint(
            source=plan.path,
            directory=self.directory,
            checkpoint_id=plan.checkpoint_id,
            optimizer_class=sharded.saved_optimizer_class(plan.doc),
            keyed_by="name",
            groups=groups,
            scheduler=self.scheduler,
            accumulator=self.accumulator,
        )

    def _entry(self, name: str, value: Any) -> Any:
        if not isinstance(value, RangeEntry):
            return value
        self.entries[value.key] = value
        chunks = tuple(Chunk(c.file, (c.start,), (c.stop - c.start,), flat=True) for c in value.chunks)
        return TensorEntry(value.key, value.shape, value.dtype, chunks, like=name)

    def scheduler(self) -> SavedScheduler | None:
        plan = self.plan
        if plan is not None and plan.checkpoint is not None:  # a single-process checkpoint: its reader's
            return plan.saved_scheduler
        saved = plan.doc.get("scheduler") if plan is not None else None
        if plan is None or saved is None:
            return None
        if not isinstance(saved, dict) or not isinstance(plan.scheduler_state, dict):
            raise CheckpointError(f"{plan.path}: 'scheduler' is malformed")
        config = saved.get("config")
        name = (
            config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else None
        )
        cls = saved.get("class") if isinstance(saved.get("class"), str) else None
        kwargs = config.get("kwargs") if name is not None and isinstance(config, dict) else None
        return SavedScheduler(f"{plan.path} (scheduler)", plan.scheduler_state, cls, name, kwargs)

    def accumulator(self) -> SavedAccumulator | None:
        return None  # ZeRO accumulates gradients itself: this layout holds no accumulator

    def _ranges(
        self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]
    ) -> dict[str, tuple[int, int] | None]:
        out: dict[str, tuple[int, int] | None] = {}
        for key, (entry, like) in entries.items():
            if like is None or tuple(like.shape) != entry.shape:
                raise CheckpointError(
                    f"{self.directory}: {key} is not laid out like a parameter of the model"
                )
            out[key] = region_range(entry.like or key, like)
        return out

    def prepare(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> None:
        """Open and check the partition files holding this process's elements."""
        assert self.plan is not None
        files: set[str] = set()
        for key, found in self._ranges(entries).items():
            if found is not None:
                files |= needed_files(self.entries[key], *found)
        open_files(self.plan, files)

    def read_ranges(self, wanted: Iterable[tuple[str, int, int, torch.Tensor]]) -> None:
        """Read elements ``[start, stop)`` of each tensor ``key`` (optimizer state or master weights) into
        ``out`` (contiguous, on the CPU): ``(key, start, stop, out)``; only the files holding them are opened."""
        assert self.plan is not None
        wanted = list(wanted)
        open_files(self.plan, {f for key, a, b, _ in wanted for f in needed_files(self.entries[key], a, b)})
        for key, start, stop, out in wanted:
            read_range(self.plan, self.entries[key], start, stop, out)

    def read(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Each entry laid out like its live tensor: whole, or this process's rows of an FSDP2 ``DTensor``."""
        assert self.plan is not None
        out: dict[str, torch.Tensor] = {}
        for key, found in self._ranges(entries).items():
            entry, like = entries[key]
            assert like is not None
            region = local_region(like)
            if region is None:
                out[key] = read_range(self.plan, self.entries[key], 0, math.prod(entry.shape)).view(
                    entry.shape
                )
                continue
            local = (
                read_range(self.plan, self.entries[key], *found)
                if found is not None
                else torch.empty(0, dtype=entry.dtype)
            )
            out[key] = sharded.like_parameter(local.view(region[1]).to(like.device), like)
        return out
