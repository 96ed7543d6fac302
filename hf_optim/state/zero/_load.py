"""Loading sharded-family state (versions 2 and 3) by element ranges: into a DeepSpeed ZeRO optimizer (any stage,
any number of processes) or into a plain single-process optimizer.

Every process checks the manifest and the headers of the files it reads against the live optimizer, the
processes agree on the verdict (if any failed, all raise its error), then each reads only the byte ranges of its
own partition and the state is applied; a failure while applying puts everything back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from hf_optim._utils import restored_on_error, unwrap_optimizer, unwrap_scheduler
from hf_optim.errors import CheckpointError
from hf_optim.state.checks import (
    check_hyperparameters,
    check_param_state,
    check_same_structure,
    check_scheduler_state,
)
from hf_optim.state.sharded import (
    agree,
    machine_union,
    parameter_names,
    sharded_manifest_files,
)
from hf_optim.state.sharded import machine_files as sharded_machine_files
from hf_optim.state.zero._format import decode_value
from hf_optim.state.zero._layout import (
    ENGINE_COUNTERS,
    ZeroLayout,
    engine_counters,
    find_zero,
    module_of,
    refresh_master_weights,
    zero_layout,
)
from hf_optim.state.zero._read import Plan, TensorEntry, needed_files, open_files, read_manifest, read_range
from hf_optim.state.zero._reader import region_range

logger = logging.getLogger(__name__)

RESERVED = frozenset({"params", "param_names", "state", "param_groups"})


class _Target:
    """What this process loads: per parameter name, its shape, group and the elements it holds."""

    def __init__(
        self,
        groups: list[list[str]],
        shapes: Mapping[str, tuple[int, ...]],
        ranges: Mapping[str, tuple[int, int] | None],
    ) -> None:
        self.groups, self.shapes, self.ranges = groups, shapes, ranges


def _zero_target(layout: ZeroLayout) -> _Target:
    ranges = {
        p.name: (p.piece.start, p.piece.start + p.piece.length) if p.piece is not None else None
        for p in layout.params
    }
    return _Target(layout.group_names(), {p.name: p.shape for p in layout.params}, ranges)


def _plain_target(opt: torch.optim.Optimizer, names: Mapping[int, str]) -> _Target:
    """An ordinary or FSDP2 optimizer's parameters as a target (for choosing the files to download)."""
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    params = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    return _Target(groups, shapes, {n: region_range(n, p) for n, p in params.items()})


def _check(
    plan: Plan, target: _Target, client: torch.optim.Optimizer, scheduler: Any
) -> tuple[list[dict], Any]:
    path = plan.path
    if len(plan.groups) != len(target.groups):
        raise CheckpointError(
            f"{path}: {len(plan.groups)} param groups saved, the optimizer has {len(target.groups)}"
        )
    hypers = []
    for g, ((saved_names, node), live_names) in enumerate(zip(plan.groups, target.groups, strict=True)):
        where = f"{path}: param_groups[{g}]"
        if saved_names != live_names:
            raise CheckpointError(f"{where} holds other parameters than the optimizer's group {g}")
        hyper = node
        if not isinstance(hyper, dict) or RESERVED & set(hyper):
            raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
        live = {k: v for k, v in client.param_groups[g].items() if k not in ("params", "param_names")}
        missing = sorted(set(live) - set(hyper))
        if missing:
            raise CheckpointError(f"{where}: hyperparameters {missing} are missing")
        hypers.append(check_hyperparameters(client, g, hyper, live, where, strict=True, notes=[]))
    for name, record in plan.state.items():
        if name not in target.shapes:
            raise CheckpointError(f"{path}: state for {name!r}, which is not a parameter of the optimizer")
        shape = target.shapes[name]
        meta = torch.empty(shape, device="meta")
        decoded = {}
        for key, value in record.items():
            if isinstance(value, TensorEntry):
                if value.shape != shape:
                    raise CheckpointError(
                        f"{path}: {value.key} has shape {list(value.shape)}, parameter {name!r} has {list(shape)}"
                    )
                decoded[key] = torch.empty(shape, dtype=value.dtype, device="meta")
            else:
                decoded[key] = value
        check_param_state(name, decoded, meta, None, path)
    for name, entry in (plan.master or {}).items():
        if target.shapes.get(name) != entry.shape:
            raise CheckpointError(
                f"{path}: master weights {entry.key} do not match a parameter of the optimizer"
            )
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = plan.scheduler_state
        if scheduler_state is None:
            raise CheckpointError(f"{path}: no scheduler state saved")
        live_sched = unwrap_scheduler(scheduler).state_dict()
        check_same_structure(scheduler_state, live_sched, f"{path}: scheduler")
        group_keys = {k for group in client.param_groups for k in group}
        check_scheduler_state(scheduler_state, live_sched, group_keys, f"{path}: scheduler")
    return hypers, scheduler_state


def _read(
    plan: Plan, target: _Target, with_master: bool, into: Mapping[tuple[str, str], torch.Tensor]
) -> dict:
    """This process's elements of every state tensor (and master weights under ``"\0master"``), by parameter:
    read into ``into[name, key]`` where given (no copy), else into new tensors (returned)."""
    wanted = [
        (name, key, entry)
        for name, record in plan.state.items()
        for key, entry in record.items()
        if isinstance(entry, TensorEntry)
    ]
    if with_master:
        wanted += [(name, "\0master", entry) for name, entry in (plan.master or {}).items()]
    files: set[str] = set()
    for name, _, entry in wanted:
        if target.ranges[name] is not None:
            files |= needed_files(entry, *target.ranges[name])
    open_files(plan, files)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, key, entry in wanted:
        if target.ranges[name] is not None:
            out.setdefault(name, {})[key] = read_range(
                plan, entry, *target.ranges[name], into.get((name, key))
            )
    return out


def _zero_buffers(
    plan: Plan, layout: ZeroLayout, with_master: bool
) -> tuple[list[dict[str, Any]], list[torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """The new state of each ZeRO partition (flat tensors, padding zero; non-tensor values decoded), the new
    master weights, and where each parameter's elements go in them (read there directly)."""
    states: list[dict[str, Any]] = [{} for _ in layout.holders]
    into: dict[tuple[str, str], torch.Tensor] = {}
    for h, holder in enumerate(layout.holders):
        members = [p for p in layout.params if p.piece is not None and p.piece.holder == h]
        group_members = [p for p in layout.params if p.group == layout.holder_group[h]]
        first = next((plan.state[p.name] for p in group_members if plan.state.get(p.name)), None)
        for key, value in (first or {}).items():
            if isinstance(value, TensorEntry):
                flat = states[h][key] = torch.zeros(holder.numel(), dtype=value.dtype)
                for p in members:
                    into[p.name, key] = flat[p.piece.local : p.piece.local + p.piece.length]
            else:
                states[h][key] = value.clone() if isinstance(value, torch.Tensor) else value
    masters = []
    if with_master:
        for h, holder in enumerate(layout.holders):
            flat = holder.detach().to("cpu", copy=True)
            masters.append(flat)
            for p in layout.params:
                if p.piece is not None and p.piece.holder == h:
                    into[p.name, "\0master"] = flat[p.piece.local : p.piece.local + p.piece.length]
    return states, masters, into


def load_ranges(
    open_plan: Callable[[], Plan], layout: ZeroLayout, *, scheduler: Any = None, engine: Any = None
) -> tuple[str, list[str], list[str]]:
    """Load a sharded-family (or single-process) checkpoint into ZeRO's flat partitions (``layout``) and the step
    counters of ``engine`` (when saved); returns the checkpoint id, the parameter names loaded and notes.

    Call it on every process of the group: the processes agree on every check before anything changes.
    """
    client = layout.client
    plan = None
    error = None
    new_states: list[dict[str, Any]] = []
    masters: list[torch.Tensor] = []
    try:
        plan = open_plan()
        target = _zero_target(layout)
        hypers, scheduler_state = _check(plan, target, client, scheduler)
        counters = _saved_counters(plan) if engine_counters(engine) is not None else None
        with_master = layout.low_precision and plan.master is not None
        _check_holders(plan, layout)
        new_states, masters, into = _zero_buffers(plan, layout, with_master)
        _read(plan, target, with_master, into)
    except (CheckpointError, OSError, ValueError) as exc:
        error = (
            str(exc) if isinstance(exc, CheckpointError) else f"{plan.path if plan else 'checkpoint'}: {exc}"
        )
    finally:
        if plan is not None:
            plan.close()
    error = agree(error)
    if error is not None:
        raise CheckpointError(error)
    notes: list[str] = []
    with restored_on_error(client, scheduler):
        _apply_zero(layout, new_states, masters, hypers, notes, plan)
        if scheduler is not None:
            unwrap_scheduler(scheduler).load_state_dict(scheduler_state)
    for key, value in (counters or {}).items():
        setattr(engine, key, value)
    return plan.checkpoint_id, sorted(plan.state), notes


def _saved_counters(plan: Plan) -> dict[str, int]:
    """The engine's step counters the checkpoint holds (none for a checkpoint of another layout)."""
    saved = plan.doc.get("engine") if plan.version >= 3 else None
    if saved is None:
        return {}
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(k), int) and not isinstance(saved.get(k), bool) and saved[k] >= 0
        for k in ENGINE_COUNTERS
        if k in saved
    ):
        raise CheckpointError(f"{plan.path}: 'engine' must map step counters to non-negative integers")
    return {k: saved[k] for k in ENGINE_COUNTERS if k in saved}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_holders(plan: Plan, layout: ZeroLayout) -> None:
    """ZeRO keeps one state per flat partition: the parameters sharing one must have the same state entries and
    the same non-tensor values (``step``)."""
    for h in range(len(layout.holders)):
        members = [p.name for p in layout.params if (p.piece.holder if p.piece is not None else None) == h]
        group = layout.holder_group[h]
        members += [p.name for p in layout.params if p.piece is None and p.group == group]
        records = [plan.state.get(n, {}) for n in members]
        if not records:
            continue
        keys = set(records[0])
        for name, record in zip(members, records, strict=True):
            if set(record) != keys:
                raise CheckpointError(
                    f"{plan.path}: parameters {members[0]!r} and {name!r} have different state entries: ZeRO keeps one state per group"
                )
            for key, value in record.items():
                if not isinstance(value, TensorEntry) and not _same(value, records[0][key]):
                    raise CheckpointError(
                        f"{plan.path}: state {key!r} differs between {members[0]!r} and {name!r}: ZeRO keeps one per group"
                    )
        live = layout.client.state.get(layout.holders[h])
        if live and keys and set(live) != keys:
            raise CheckpointError(
                f"{plan.path}: saved state entries {sorted(keys)}, the optimizer keeps {sorted(live)}"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


def _apply_zero(
    layout: ZeroLayout,
    new_states: list[dict[str, Any]],
    masters: list[torch.Tensor],
    hypers: list[dict],
    notes: list[str],
    plan: Plan,
) -> None:
    client = layout.client
    if layout.low_precision and not masters:
        notes.append("no fp32 master weights saved: they are the model's weights")
    for h, holder in enumerate(layout.holders):
        if new_states[h]:
            client.state[holder] = {
                k: v.to(holder.device) if isinstance(v, torch.Tensor) else v for k, v in new_states[h].items()
            }
    for group, hyper in zip(client.param_groups, hypers, strict=True):
        group.update(hyper)
    _load_scaler(plan, layout.zero, notes)
    # last (restored_on_error puts back the rest): the master weights, in place
    if masters:
        for holder, flat in zip(layout.holders, masters, strict=True):
            holder.data.copy_(flat)
    elif not layout.low_precision:
        refresh_master_weights(layout)


def _load_scaler(plan: Plan, zero: Any, notes: list[str]) -> None:
    saved = plan.doc.get("loss_scaler")
    scaler = getattr(zero, "loss_scaler", None)
    if not isinstance(saved, dict) or scaler is None:
        return
    if saved.get("class") != type(scaler).__qualname__:
        notes.append(
            f"loss scaler {saved.get('class')!r} saved, {type(scaler).__qualname__} live: not restored"
        )
        return
    values = decode_value(saved.get("state"), f"{plan.path}: loss_scaler")
    if not isinstance(values, dict):
        raise CheckpointError(f"{plan.path}: loss_scaler state must be an object")
    for key, value in values.items():
        live = getattr(scaler, key, None)
        if isinstance(value, bool | int | float) and type(live) is type(value):
            setattr(scaler, key, value)


def is_range_layout(directory: str) -> bool:
    """Whether ``directory``'s sharded manifest is format version 3 (ranges), which the box reader does not read."""
    try:
        plan = read_manifest(directory)
    except CheckpointError:
        return False
    return plan.version >= 3


__all__ = ["is_range_layout", "load_ranges"]


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
        if zero is not None:
            target = _zero_target(zero_layout(zero, model))
        else:
            opt = unwrap_optimizer(optimizer)
            target = _plain_target(opt, parameter_names(module_of(model), opt))
        mine = set()
        for name, record in plan.state.items():
            for entry in [*(v for v in record.values() if isinstance(v, TensorEntry)), *_master(plan, name)]:
                if target.ranges.get(name) is not None:
                    mine |= needed_files(entry, *target.ranges[name])
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
