"""Which files of a sharded-family checkpoint (versions 2 and 3) the processes on a machine read, for
downloading only those from the Hub: ZeRO's partitions, an FSDP2 shard's rows, or everything in a plain process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from hf_optim._utils import unwrap_optimizer
from hf_optim.errors import CheckpointError
from hf_optim.state.sharded import agree, machine_union, parameter_names, sharded_manifest_files
from hf_optim.state.sharded import machine_files as sharded_machine_files
from hf_optim.state.zero._layout import ZeroLayout, find_zero, zero_layout
from hf_optim.state.zero._read import Plan, TensorEntry, needed_files, read_manifest
from hf_optim.state.zero._reader import region_range

__all__ = ["is_range_layout", "machine_files", "manifest_files"]


def _zero_ranges(layout: ZeroLayout) -> Mapping[str, tuple[int, int] | None]:
    """The elements of each parameter this process holds in ZeRO's partitions."""
    return {
        p.name: (p.piece.start, p.piece.start + p.piece.length) if p.piece is not None else None
        for p in layout.params
    }


def _plain_ranges(optimizer: Any, model: Any) -> Mapping[str, tuple[int, int] | None]:
    """The elements of each parameter of an ordinary or FSDP2 optimizer this process holds."""
    opt = unwrap_optimizer(optimizer)
    names = parameter_names(model, opt)
    params = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    return {n: region_range(n, p) for n, p in params.items()}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_range_layout(directory: str) -> bool:
    """Whether ``directory``'s sharded manifest is format version 3 (ranges), which the box reader does not read."""
    try:
        plan = read_manifest(directory)
    except CheckpointError:
        return False
    return plan.version >= 3


def manifest_files(path: str) -> list[str]:
    """The files a sharded-family manifest (version 2 or 3) references (relative paths, itself first)."""
    try:
        plan = read_manifest(os.path.dirname(path))
    except CheckpointError:  # a version-2 manifest without chunk records: the box reader lists it
        return sharded_manifest_files(path)
    return [os.path.basename(path), *(f"{plan.folder}/{name}" for name in plan.files)]


def machine_files(manifest_path: str, optimizer: Any, model: Any) -> list[str]:
    """The files of a sharded-family checkpoint the processes on this machine read under ``optimizer`` (ZeRO or
    plain / FSDP2) and ``model`` (relative paths, the manifest first): for downloading only those. Every file
    when the manifest does not fit (the load then says why). A collective: call it on every process."""
    if find_zero(optimizer, model) is None and not is_range_layout(os.path.dirname(manifest_path)):
        return sharded_machine_files(manifest_path, model)  # FSDP2 / plain from version 2: DCP's planner
    error = listed = None
    try:
        listed = manifest_files(manifest_path)
    except CheckpointError as exc:
        error = str(exc)
    error = agree(error) if _distributed() else error
    if error is not None or listed is None:
        raise CheckpointError(error or "another process could not read the manifest")
    mine: set[str] | None = None
    try:
        plan = read_manifest(os.path.dirname(manifest_path))
        zero = find_zero(optimizer, model)
        ranges = (
            _zero_ranges(zero_layout(zero, model)) if zero is not None else _plain_ranges(optimizer, model)
        )
        mine = set()
        for name, record in plan.state.items():
            for entry in [*(v for v in record.values() if isinstance(v, TensorEntry)), *_master(plan, name)]:
                held = ranges.get(name)
                if held is not None:
                    mine |= needed_files(entry, *held)
    except Exception:  # only chooses what to download: the load itself reports the problem, on every rank
        mine = None
    names = [os.path.basename(f) for f in listed[1:]]
    wanted = (
        machine_union([mine is None or name in mine for name in names])
        if _distributed()
        else [mine is None or name in mine for name in names]
    )
    return [listed[0], *(f for f, want in zip(listed[1:], wanted, strict=True) if want)]


def _master(plan: Plan, name: str) -> list[TensorEntry]:
    entry = (plan.master or {}).get(name)
    return [entry] if entry is not None else []
