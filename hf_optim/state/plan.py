"""One check and one apply for every layout: a :class:`~hf_optim.state.model.SavedCheckpoint` against the live
optimizer, scheduler and accumulator (:func:`check`), then installed with a rollback (:func:`apply`).

``strict=True`` refuses any difference; ``strict=False`` loads the matching part and lists the rest in the
:class:`~hf_optim.state.model.LoadReport`. Values that could never be loaded (bad types, NaN learning rates,
wrong state shapes) are refused either way.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim._utils import restored_on_error, unwrap_scheduler
from hf_optim.errors import CheckpointError
from hf_optim.state.checks import (
    check_hyperparameters,
    check_param_state,
    check_same_structure,
    check_scheduler_state,
    expected_state_keys,
)
from hf_optim.state.format import qualname
from hf_optim.state.match import fail, plan_optimizer, raise_errors
from hf_optim.state.model import LoadReport, SavedCheckpoint, TensorEntry, placeholders, tensor_entries

logger = logging.getLogger("hf_optim.state")

__all__ = ["SCHEDULER_GROUP_KEYS", "Live", "LoadPlan", "apply", "check", "report"]

#: param-group keys torch's schedulers add when they are created (LRScheduler's initial_lr, OneCycleLR's and
#: CyclicLR's learning-rate and momentum bounds)
SCHEDULER_GROUP_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr", "initial_lr_scale"}
)


@dataclass
class Live:
    """The live objects a checkpoint loads into. ``names``: parameter names by ``id`` (from the model), used to
    match when the optimizer's groups carry no ``param_names``; ``model_params``: the model's parameters by name
    (tensors laid out like one of them, such as the accumulator's gradients, are read like it)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    accumulator: Any = None
    names: Mapping[int, str] | None = None
    model_params: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LoadPlan:
    """What :func:`check` accepted: the optimizer state dict to load (with :class:`TensorEntry` placeholders),
    the scheduler and accumulator states, the tensors to read (key -> (entry, live tensor to lay it out like)),
    and the report's lists."""

    saved: SavedCheckpoint
    live: Live
    state_dict: dict[str, Any]
    loaded: dict[int, str]  #: live state-dict index -> saved key
    restore_groups: bool
    lists: dict[str, list[str]]
    scheduler_state: dict[str, Any] | None
    accumulator_state: dict[str, Any] | None
    sources: dict[str, str]  #: the file each part comes from ("scheduler", "accumulator"), for messages
    reads: dict[str, tuple[TensorEntry, torch.Tensor | None]]
    notes: list[str]
    scheduler_mismatch: dict[str, tuple[Any, Any]]


def check(saved: SavedCheckpoint, live: Live, strict: bool) -> LoadPlan:
    """Compare ``saved`` with ``live``; raise (nothing changed) or return what to load."""
    notes: list[str] = []
    mismatch: dict[str, tuple[Any, Any]] = {}
    opt = live.optimizer
    live_sd = opt.state_dict()
    unnamed = [g for g, sd_group in enumerate(live_sd["param_groups"]) if "param_names" not in sd_group]
    if (
        live.names is not None
    ):  # name the parameters for matching only: the optimizer's groups stay as they are
        for g in unnamed:
            live_sd["param_groups"][g]["param_names"] = [
                live.names[id(p)] for p in opt.param_groups[g]["params"]
            ]
    _check_layouts(saved, live)
    plan, group_map, lists = plan_optimizer(saved, opt, live_sd, strict, notes)
    restore_groups = group_map is not None
    if group_map is None:
        notes.append("param-group hyperparameters not restored (the groups do not pair up)")
    params = [p for group in opt.param_groups for p in group["params"]]
    index_to_param = dict(zip((i for g in live_sd["param_groups"] for i in g["params"]), params, strict=True))
    index_to_group = {i: g for g, group in enumerate(live_sd["param_groups"]) for i in group["params"]}
    new_state: dict[Any, Any] = {i: s for i, s in live_sd["state"].items() if i not in plan}  # kept as it was
    new_groups = []
    for g, live_group in enumerate(live_sd["param_groups"]):
        group = dict(live_group)
        if group_map is not None:
            where = f"{saved.source}: param group {g}"
            hyper = saved.groups[group_map[g]].hyperparameters
            live_hyper = {k: v for k, v in live_group.items() if k not in ("params", "param_names")}
            # keys a scheduler adds to the groups when it is created (initial_lr...): restored before it exists,
            # as torch's load_state_dict does; they must be numbers
            for k in sorted(SCHEDULER_GROUP_KEYS & (set(hyper) - set(live_hyper))):
                value = hyper[k]
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise CheckpointError(
                        f"{where}: hyperparameter {k!r} must be a finite number, got {value!r}"
                    )
                live_hyper[k] = value
            group.update(check_hyperparameters(opt, g, hyper, live_hyper, where, strict=strict, notes=notes))
            absent = sorted(set(live_hyper) - set(hyper))
            if absent:
                notes.append(
                    f"param group {g}: kept the optimizer's values of {absent} (not in the checkpoint)"
                )
        if g in unnamed:
            group.pop("param_names", None)
        new_groups.append(group)
    by_key = {p.key: p for p in saved.params}
    reads: dict[str, tuple[TensorEntry, torch.Tensor | None]] = {}
    expected: dict[tuple[int, torch.dtype], frozenset[str] | None] = {}
    for index, key in plan.items():
        state = by_key[key].state
        if state is None:
            continue
        param, g = index_to_param[index], index_to_group[index]
        for e in tensor_entries(state):
            if e.like is not None and e.shape != tuple(param.shape):
                raise CheckpointError(
                    f"{saved.source}: {e.key} has global shape {list(e.shape)}, parameter {key!r} has "
                    f"{list(param.shape)}"
                )
        live_pstate = live_sd["state"].get(index)
        if not live_pstate and (g, param.dtype) not in expected:
            expected[g, param.dtype] = expected_state_keys(opt, new_groups[g], param)
        check_param_state(
            key,
            placeholders(state),
            param,
            live_pstate,
            saved.source,
            expected_keys=expected.get((g, param.dtype)),
        )
        new_state[index] = state
        reads.update({e.key: (e, param) for e in tensor_entries(state)})
    state_dict: dict[str, Any] = {"state": new_state, "param_groups": new_groups, **saved.extra}
    sources: dict[str, str] = {}
    sched = (
        _check_scheduler(saved, live, strict, notes, mismatch, sources)
        if live.scheduler is not None
        else None
    )
    acc = _check_accumulator(saved, live, strict, notes, sources) if live.accumulator is not None else None
    for e in tensor_entries(acc):
        reads[e.key] = (e, live.model_params.get(e.like) if e.like is not None else None)
    return LoadPlan(
        saved, live, state_dict, plan, restore_groups, lists, sched, acc, sources, reads, notes, mismatch
    )


def _check_layouts(saved: SavedCheckpoint, live: Live) -> None:
    """Tensors placed like a model parameter (not optimizer state) fit one: it exists with their shape."""
    for e in saved.laid_out_like:
        like = live.model_params.get(e.like) if e.like is not None else None
        if like is None or tuple(like.shape) != e.shape:
            raise CheckpointError(
                f"{saved.source}: {e.key} has global shape {list(e.shape)} and is placed like parameter "
                f"{str(e.like)[:200]!r}, which "
                + ("the model lacks" if like is None else f"has shape {list(like.shape)}")
            )


def _check_scheduler(
    saved: SavedCheckpoint,
    live: Live,
    strict: bool,
    notes: list[str],
    mismatch: dict[str, tuple[Any, Any]],
    sources: dict[str, str],
) -> dict[str, Any] | None:
    errors: list[str] = []
    sched = saved.scheduler()
    if sched is None:
        fail(
            errors, strict, notes, f"the checkpoint has no {saved.scheduler_label} but a scheduler was given"
        )
        raise_errors(errors, saved.source)
        return None
    path = sources["scheduler"] = sched.source
    notes_before = len(notes)
    inner = unwrap_scheduler(live.scheduler)
    if sched.class_name is not None and sched.class_name != qualname(inner):
        fail(errors, strict, notes, f"{path} was saved from {sched.class_name}, not {qualname(inner)}")
    config = getattr(inner, "hf_optim_config", None)
    live_name = config.get("name") if isinstance(config, Mapping) else None
    if sched.name is not None and live_name is not None and sched.name != live_name:
        fail(
            errors, strict, notes, f"{path} holds schedule {sched.name!r} but the scheduler is {live_name!r}"
        )
    live_state = {k: v for k, v in inner.state_dict().items() if k != "hf_optim_config"}
    state = {k: v for k, v in sched.state.items() if k != "hf_optim_config"}
    base_lrs, live_lrs = state.get("base_lrs"), live_state.get("base_lrs")
    if isinstance(base_lrs, list) and isinstance(live_lrs, list) and len(base_lrs) != len(live_lrs):
        fail(
            errors, strict, notes, f"{path} has {len(base_lrs)} learning rates, the scheduler {len(live_lrs)}"
        )
    if not errors and len(notes) == notes_before:
        # same class and group count: the state must have exactly the live state's keys and types
        check_same_structure(state, live_state, f"{path}: state_dict")
        group_keys = {k for g in live.optimizer.param_groups for k in g if isinstance(k, str)}
        check_scheduler_state(state, live_state, group_keys, f"{path}: state_dict")
        last_epoch = state.get("last_epoch")
        if "last_epoch" in live_state and (not isinstance(last_epoch, int) or isinstance(last_epoch, bool)):
            raise CheckpointError(f"{path}: last_epoch must be an int, got {last_epoch!r}")
    raise_errors(errors, saved.source)
    if len(notes) > notes_before:
        notes.append("scheduler state not loaded")
        return None
    if sched.name is not None and sched.name == live_name:
        live_kwargs = config.get("kwargs") if isinstance(config, Mapping) else None
        if sched.kwargs != live_kwargs:
            notes.append(
                f"schedule {sched.name!r} was saved with arguments {sched.kwargs}, now {live_kwargs}"
            )
            saved_map = sched.kwargs if isinstance(sched.kwargs, dict) else {}
            live_map = live_kwargs if isinstance(live_kwargs, Mapping) else {}
            for key in sorted(set(saved_map) | set(live_map), key=str):
                if saved_map.get(key) != live_map.get(key):
                    mismatch[key] = (saved_map.get(key), live_map.get(key))
    return state


def _check_accumulator(
    saved: SavedCheckpoint, live: Live, strict: bool, notes: list[str], sources: dict[str, str]
) -> dict[str, Any] | None:
    """Class, the counters' structure, number, shapes and dtypes of the gradients (a gradient laid out like a
    model parameter: that parameter exists with the gradient's shape)."""
    errors: list[str] = []
    acc = saved.accumulator()
    if acc is None:
        fail(
            errors,
            strict,
            notes,
            f"the checkpoint has no {saved.accumulator_label} but an accumulator was given",
        )
        raise_errors(errors, saved.source)
        return None
    path, accumulator = acc.source, live.accumulator
    sources["accumulator"] = path
    notes_before = len(notes)
    if acc.class_name is not None and acc.class_name != qualname(accumulator):
        fail(errors, strict, notes, f"{path} was saved from {acc.class_name}, not {qualname(accumulator)}")
    live_state = accumulator.state_dict() if callable(getattr(accumulator, "state_dict", None)) else None
    saved_grads = acc.state.get("gradients")
    num_params = len(live.model_params)
    if isinstance(saved_grads, list) and num_params and len(saved_grads) > num_params:
        # the gradients of some of the model's parameters: the next micro-batch would not fit
        raise CheckpointError(
            f"{path}: {len(saved_grads)} accumulator gradients saved, more than the model's {num_params} parameters"
        )
    for i, g in enumerate(saved_grads if isinstance(saved_grads, list) else []):
        shown = placeholders(g)
        if isinstance(shown, torch.Tensor) and not shown.is_floating_point():
            raise CheckpointError(
                f"{path}: gradient {i} has dtype {shown.dtype}; gradients are floating point"
            )
        if isinstance(g, TensorEntry) and g.like is not None:
            like = live.model_params.get(g.like)
            if like is None or tuple(like.shape) != g.shape:
                raise CheckpointError(
                    f"{path}: gradient {i} (shape {list(g.shape)}) is laid out like parameter {g.like!r}, which "
                    + ("the model lacks" if like is None else f"has shape {list(like.shape)}")
                )
    live_grads = live_state.get("gradients") if isinstance(live_state, Mapping) else None
    if isinstance(saved_grads, list) and isinstance(live_grads, list) and live_grads:
        if len(saved_grads) != len(live_grads):
            fail(
                errors,
                strict,
                notes,
                f"{path} has {len(saved_grads)} gradients, the accumulator {len(live_grads)}",
            )
        else:
            for i, (node, g) in enumerate(zip(saved_grads, live_grads, strict=True)):
                shape = getattr(node, "shape", None)
                if isinstance(g, torch.Tensor) and shape is not None and tuple(shape) != tuple(g.shape):
                    fail(
                        errors,
                        strict,
                        notes,
                        f"{path}: gradient {i} has shape {tuple(shape)}, the accumulator's {tuple(g.shape)}",
                    )
    raise_errors(errors, saved.source)
    if len(notes) > notes_before:
        notes.append("accumulator state not loaded")
        return None
    if isinstance(live_state, Mapping):
        check_same_structure(
            {k: v for k, v in acc.state.items() if k != "gradients"},
            {k: v for k, v in live_state.items() if k != "gradients"},
            f"{path}: state",
        )
    return acc.state


def apply(plan: LoadPlan, tensors: Mapping[str, torch.Tensor]) -> LoadReport:
    """Install ``plan`` with the read ``tensors`` through each object's own ``load_state_dict``; on any failure
    every object is restored exactly as it was. State tensors keep their saved dtype."""
    live, saved = plan.live, plan.saved
    opt, scheduler, accumulator = live.optimizer, live.scheduler, live.accumulator
    state_dict = placeholders(plan.state_dict, tensors)
    stage = saved.source
    with restored_on_error(opt, scheduler, accumulator if plan.accumulator_state is not None else None):
        try:
            opt.load_state_dict(state_dict)
            _keep_saved_dtypes(
                opt, {i: state_dict["state"][i] for i in plan.loaded if i in state_dict["state"]}
            )
            if plan.scheduler_state is not None:
                stage = plan.sources["scheduler"]
                # hf_optim_config describes the live scheduler's function: keep it (the kwargs were compared)
                unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(plan.scheduler_state))
            if plan.accumulator_state is not None:
                stage = plan.sources["accumulator"]
                accumulator.load_state_dict(placeholders(plan.accumulator_state, tensors))
        except (ValueError, TypeError, KeyError, OverflowError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            # the object's own load_state_dict refused a value the checks let through
            raise CheckpointError(f"{stage}: refused while loading: {type(err).__name__}: {err}") from err
    return report(plan)


def report(plan: LoadPlan) -> LoadReport:
    """The :class:`~hf_optim.state.model.LoadReport` of an installed plan (and one warning if it left anything
    out): for :func:`apply` and the layouts that install a plan themselves."""
    saved, scheduler, accumulator = plan.saved, plan.live.scheduler, plan.live.accumulator
    if plan.notes:
        logger.warning(
            "load_state(%s): loaded with %d difference(s): %s",
            saved.directory,
            len(plan.notes),
            "; ".join(plan.notes),
        )
    return LoadReport(
        source=saved.directory,
        checkpoint_id=saved.checkpoint_id,
        loaded=tuple(plan.loaded.values()),
        missing=tuple(plan.lists["missing"]),
        unexpected=tuple(plan.lists["unexpected"]),
        mismatched=tuple(plan.lists["mismatched"]),
        param_groups_restored=plan.restore_groups,
        scheduler_loaded=plan.scheduler_state is not None,
        accumulator_loaded=plan.accumulator_state is not None,
        scheduler_skipped=scheduler is not None and plan.scheduler_state is None,
        accumulator_skipped=accumulator is not None and plan.accumulator_state is None,
        notes=tuple(plan.notes),
        scheduler_mismatch=plan.scheduler_mismatch,
    )


def _keep_saved_dtypes(opt: torch.optim.Optimizer, saved_values: Mapping[int, Mapping[str, Any]]) -> None:
    """Undo torch's cast of floating state to the parameter dtype: the state keeps the dtype it was saved with."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, values in saved_values.items():
        state = opt.state.get(params[index]) if index < len(params) else None
        if not state:
            continue
        for k, value in values.items():
            current = state.get(k)
            if (
                k != "step"
                and isinstance(value, torch.Tensor)
                and isinstance(current, torch.Tensor)
                and current.dtype != value.dtype
            ):
                state[k] = value.to(device=current.device)
