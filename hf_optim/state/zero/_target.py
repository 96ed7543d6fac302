"""DeepSpeed ZeRO's flat partitions as a load target of the checkpoint model.

The checkpoint is checked like any other (:func:`hf_optim.state.plan.check`, same rules and messages, ``strict``
meaning what it means everywhere) against a per-parameter view of the client optimizer (:func:`zero_view`: its
class and groups, each parameter as a ``meta`` tensor of its global shape). What ZeRO adds is done here: the
parameters sharing one flat partition load together or not at all (ZeRO keeps one state per partition), each
process reads only its elements of every state tensor (and of the fp32 master weights) straight into new flat
tensors, then everything is installed at once, the loss scaler and the engine's step counters included, with
the rollback of every load.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any

import torch

from hf_optim._utils import restored_on_error, unwrap_scheduler
from hf_optim.errors import CheckpointError
from hf_optim.state.model import LoadReport, TensorEntry
from hf_optim.state.plan import LoadPlan, report
from hf_optim.state.zero._format import decode_value
from hf_optim.state.zero._layout import ENGINE_COUNTERS, ZeroLayout, engine_counters, refresh_master_weights
from hf_optim.state.zero._reader import RangeReader

__all__ = ["ZeroInstall", "zero_view"]


def zero_view(layout: ZeroLayout) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """The client optimizer seen per parameter, for the checks only: an object of its class with its groups'
    hyperparameters, each parameter a ``meta`` tensor of its global shape (fp32, the master weights' dtype) whose
    state, if the partition has any, is the partition's (tensors as ``meta`` of the parameter's shape); and the
    parameters' names by ``id``."""
    client = layout.client
    view = object.__new__(type(client))  # the class and its attributes; groups and state are the view's own
    view.__dict__.update(client.__dict__)
    names: dict[int, str] = {}
    groups = []
    state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
    for g, group in enumerate(client.param_groups):
        params = []
        for p in layout.params:
            if p.group != g:
                continue
            tensor = torch.empty(p.shape, dtype=torch.float32, device="meta")
            names[id(tensor)] = p.name
            params.append(tensor)
            held = client.state.get(layout.holders[p.holder])
            if held:
                state[tensor] = {
                    k: torch.empty(p.shape, dtype=v.dtype, device="meta")
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                    else v
                    for k, v in held.items()
                }
        groups.append(
            {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, "params": params}
        )
    view.param_groups = groups
    view.state = state
    return view, names


class ZeroInstall:
    """Reads and installs a checked plan into ZeRO's flat partitions (``load_with(..., into=)``)."""

    def __init__(self, layout: ZeroLayout, engine: Any = None) -> None:
        self.layout = layout
        self.engine = engine

    def stage(self, plan: LoadPlan, reader: RangeReader) -> dict[str, Any]:
        """Check what ZeRO adds, then read this process's elements: returns what :meth:`apply` installs."""
        layout, saved = self.layout, plan.saved
        assert reader.plan is not None
        by_name = {p.name: p for p in layout.params}
        index_of = {name: i for i, name in enumerate(p.name for p in _view_order(layout))}
        states = plan.state_dict["state"]
        members: dict[int, list[str]] = {}
        for p in layout.params:
            members.setdefault(p.holder, []).append(p.name)
        holders: dict[int, dict[str, Any]] = {}
        for h, names in members.items():
            taken = [n for n in names if index_of[n] in plan.loaded and states.get(index_of[n]) is not None]
            if not taken:
                continue
            if len(taken) < len(names):  # strict=False left out part of a partition: none of it can load
                for n in taken:
                    plan.loaded.pop(index_of[n])
                    plan.lists["mismatched"].append(n)
                plan.notes.append(
                    f"{', '.join(repr(n) for n in taken[:3])}: not loaded, ZeRO keeps one state for "
                    f"{len(names)} parameters of which the checkpoint gives {len(taken)}"
                )
                continue
            records = [states[index_of[n]] for n in taken]
            keys = set(records[0])
            for name, record in zip(taken, records, strict=True):
                if set(record) != keys:
                    raise CheckpointError(
                        f"{saved.source}: parameters {taken[0]!r} and {name!r} have different state entries: "
                        "ZeRO keeps one state per partition"
                    )
                for key, value in record.items():
                    if not isinstance(value, TensorEntry) and not _same(value, records[0][key]):
                        raise CheckpointError(
                            f"{saved.source}: state {key!r} differs between {taken[0]!r} and {name!r}: ZeRO "
                            "keeps one per partition"
                        )
            holders[h] = records[0]
        master = reader.plan.master if layout.low_precision else None
        wanted: list[tuple[str, int, int, torch.Tensor]] = []
        new_states: dict[int, dict[str, Any]] = {}
        for h, first in holders.items():
            flat_size = layout.holders[h].numel()
            new_states[h] = {}
            for key, value in first.items():
                if not isinstance(value, TensorEntry):
                    new_states[h][key] = value.clone() if isinstance(value, torch.Tensor) else value
                    continue
                flat = new_states[h][key] = torch.zeros(flat_size, dtype=value.dtype)
                for name in members[h]:
                    piece = by_name[name].piece
                    entry = states[index_of[name]][key]
                    if piece is not None:
                        out = flat[piece.local : piece.local + piece.length]
                        wanted.append((entry.key, piece.start, piece.start + piece.length, out))
        masters: dict[int, torch.Tensor] = {}
        if master is not None:
            for h in holders:
                flat = masters[h] = self.layout.holders[h].detach().to("cpu", copy=True)
                for name in members[h]:
                    entry = master.get(name)
                    if entry is None or entry.shape != by_name[name].shape:
                        raise CheckpointError(f"{saved.source}: no master weights of {name!r} in its shape")
                    piece = by_name[name].piece
                    if piece is not None:
                        out = flat[piece.local : piece.local + piece.length]
                        wanted.append((entry.key, piece.start, piece.start + piece.length, out))
        counters = _saved_counters(reader) if engine_counters(self.engine) is not None else {}
        scaler = _saved_scaler(saved.source, reader.plan.doc, layout.zero, plan.notes)
        reader.read_ranges(wanted)
        return {"states": new_states, "masters": masters, "counters": counters, "scaler": scaler}

    def apply(self, plan: LoadPlan, staged: dict[str, Any]) -> LoadReport:
        """Install the staged state, the groups' hyperparameters, the scheduler, the loss scaler, the master
        weights and the engine's counters; on any failure the optimizer and scheduler are put back."""
        layout = self.layout
        client, scheduler = layout.client, plan.live.scheduler
        with restored_on_error(client, scheduler):
            try:
                for h, state in staged["states"].items():
                    holder = layout.holders[h]
                    client.state[holder] = {
                        k: v.to(holder.device) if isinstance(v, torch.Tensor) else v for k, v in state.items()
                    }
                if plan.restore_groups:
                    for group, new in zip(client.param_groups, plan.state_dict["param_groups"], strict=True):
                        group.update({k: v for k, v in new.items() if k not in ("params", "param_names")})
                if plan.scheduler_state is not None:
                    unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(plan.scheduler_state))
            except (ValueError, TypeError, KeyError, OverflowError, RuntimeError) as err:
                # the scheduler's own load_state_dict refused a value the checks let through
                raise CheckpointError(
                    f"{plan.saved.source}: refused while loading: {type(err).__name__}: {err}"
                ) from err
            for key, value in staged["scaler"].items():
                setattr(layout.zero.loss_scaler, key, value)
        # last, once nothing can fail: the master weights, in place
        if staged["masters"]:
            for h, flat in staged["masters"].items():
                layout.holders[h].data.copy_(flat)
        elif not layout.low_precision and staged["states"]:
            refresh_master_weights(layout)
        elif layout.low_precision and staged["states"]:
            plan.notes.append("no fp32 master weights saved: they are the model's weights")
        for key, value in staged["counters"].items():
            setattr(self.engine, key, value)
        return report(plan)


def _view_order(layout: ZeroLayout) -> list[Any]:
    """The parameters in the view's state-dict order: group by group."""
    return [p for g in range(len(layout.client.param_groups)) for p in layout.params if p.group == g]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


def _saved_counters(reader: RangeReader) -> dict[str, int]:
    """The engine's step counters the checkpoint holds (none for a checkpoint of another layout)."""
    assert reader.plan is not None
    plan = reader.plan
    saved = plan.doc.get("engine") if plan.version >= 3 else None
    if saved is None:
        return {}
    if not isinstance(saved, dict) or not all(
        isinstance(saved[k], int) and not isinstance(saved[k], bool) and saved[k] >= 0
        for k in ENGINE_COUNTERS
        if k in saved
    ):
        raise CheckpointError(f"{plan.path}: 'engine' must map step counters to non-negative integers")
    return {k: saved[k] for k in ENGINE_COUNTERS if k in saved}


def _saved_scaler(source: str, doc: dict[str, Any], zero: Any, notes: list[str]) -> dict[str, Any]:
    """The loss scaler's numbers to restore: only into a scaler of the class that saved them, each value of the
    type the live scaler holds."""
    saved = doc.get("loss_scaler")
    scaler = getattr(zero, "loss_scaler", None)
    if not isinstance(saved, dict) or scaler is None:
        return {}
    if saved.get("class") != type(scaler).__qualname__:
        notes.append(
            f"loss scaler {saved.get('class')!r} saved, {type(scaler).__qualname__} live: not restored"
        )
        return {}
    values = decode_value(saved.get("state"), f"{source}: loss_scaler")
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: loss_scaler state must be an object")
    out = {}
    for key, value in values.items():
        live = getattr(scaler, key, None)
        if isinstance(value, bool | int | float) and type(live) is type(value):
            if isinstance(value, float) and not math.isfinite(value):
                raise CheckpointError(f"{source}: loss_scaler {key!r} is {value}")
            out[key] = value
    return out
