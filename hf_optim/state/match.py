"""Matching a checkpoint's parameters to the live optimizer's: by name, else by position, with shape checks.

The plan it returns (live state-dict index -> saved parameter key) is the only mapping handed to torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.checks import TENSOR_STATE as MOMENTS
from hf_optim.state.format import dtype_name, qualname
from hf_optim.state.model import SavedCheckpoint, SavedParam, TensorEntry

__all__ = ["fail", "plan_optimizer", "raise_errors"]


@dataclass
class _Live:
    index: int
    name: str | None
    param: torch.Tensor
    group: int

    @property
    def key(self) -> str:
        return self.name if self.name is not None else str(self.index)


def fail(errors: list[str], strict: bool, notes: list[str], message: str) -> None:
    (errors if strict else notes).append(message)


def raise_errors(errors: list[str], source: str) -> None:
    if errors:
        shown = "".join(f"\n  - {e}" for e in errors[:8])
        more = f"\n  (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise CheckpointError(f"cannot load the optimizer state from {source}:{shown}{more}")


def plan_optimizer(
    saved: SavedCheckpoint,
    opt: torch.optim.Optimizer,
    live_sd: Mapping[str, Any],
    strict: bool,
    notes: list[str],
) -> tuple[dict[int, str], list[int] | None, dict[str, list[str]]]:
    """Match checkpoint parameters to live ones; returns (live index -> saved key, the saved group each live
    group takes its hyperparameters from or None, report lists)."""
    errors: list[str] = []
    saved_class = saved.optimizer_class
    if saved_class is not None and saved_class != qualname(opt):
        fail(errors, strict, notes, f"the state was saved from {saved_class}, not {qualname(opt)}")
    saved_groups = saved.groups
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
    by_name = saved.keyed_by == "name" and all(p.name is not None for p in flat_live)
    saved_records = [(g, rec, rec.key) for g, group in enumerate(saved_groups) for rec in group.params]
    same_structure = len(saved_groups) == len(live) and all(
        len(sg.params) == len(lg) for sg, lg in zip(saved_groups, live, strict=True)
    )

    pairs: list[tuple[_Live, str, SavedParam, int]] = []  # live, saved key, saved record, saved group
    missing: list[str] = []
    unexpected: list[str] = []
    if by_name:
        saved_by_name = {key: (g, rec) for g, rec, key in saved_records}
        live_names = {p.name for p in flat_live}
        for p in flat_live:
            if p.name in saved_by_name:
                g, rec = saved_by_name[p.name]
                if g != p.group:
                    fail(
                        errors,
                        strict,
                        notes,
                        f"parameter {p.name!r} is in param group {g} of the checkpoint but group {p.group} now",
                    )
                pairs.append((p, p.name, rec, g))
            else:
                missing.append(p.name)  # type: ignore[arg-type]  # not None: by_name checked every live name
        unexpected = [key for _, _, key in saved_records if key not in live_names]
    elif same_structure:
        for g, (sg, lg) in enumerate(zip(saved_groups, live, strict=True)):
            for rec, p in zip(sg.params, lg, strict=True):
                pairs.append((p, rec.key, rec, g))
        if saved.keyed_by == "name" and not any(p.name for p in flat_live):
            notes.append("the optimizer has no parameter names: parameters matched by position")
    else:
        sizes = [len(g.params) for g in saved_groups]
        live_sizes = [len(g) for g in live]
        fail(
            errors,
            strict,
            notes,
            f"parameter groups have sizes {sizes} in the checkpoint but {live_sizes} in the optimizer, and "
            "parameters cannot be matched by name",
        )
        missing = [p.key for p in flat_live]
        unexpected = [key for _, _, key in saved_records]
    if len(saved_groups) != len(live):
        # name the difference: the parameters one side has in groups the other lacks
        detail = ""
        if by_name and (missing or unexpected):
            parts = []
            if missing:
                parts.append(
                    f"optimizer parameters not in the checkpoint: {', '.join(map(repr, missing[:5]))}"
                )
            if unexpected:
                parts.append(
                    f"checkpoint parameters the optimizer lacks: {', '.join(map(repr, unexpected[:5]))}"
                )
            detail = f" ({'; '.join(parts)})"
        elif not by_name:
            detail = (
                f" (groups of sizes {[len(g.params) for g in saved_groups]} in the checkpoint, "
                f"{[len(g) for g in live]} in the optimizer)"
            )
        fail(
            errors,
            strict,
            notes,
            f"the checkpoint has {len(saved_groups)} parameter group(s), the optimizer {len(live)}{detail}",
        )
    if missing:
        fail(
            errors,
            strict,
            notes,
            f"optimizer parameter(s) missing from the checkpoint: {', '.join(map(repr, missing[:5]))}"
            + (" ..." if len(missing) > 5 else ""),
        )
    if unexpected:
        fail(
            errors,
            strict,
            notes,
            f"checkpoint parameter(s) the optimizer does not have: {', '.join(map(repr, unexpected[:5]))}"
            + (" ..." if len(unexpected) > 5 else ""),
        )

    plan: dict[int, str] = {}
    mismatched: list[str] = []
    for p, key, rec, _g in pairs:
        shape = rec.shape
        if shape is None and rec.state:  # no recorded shape (sharded layout): its moments' global shape
            shapes = {e.shape for k, e in rec.state.items() if isinstance(e, TensorEntry) and k in MOMENTS}
            shape = next(iter(shapes)) if len(shapes) == 1 else None
        if shape is not None and list(shape) != list(p.param.shape):
            mismatched.append(key)
            fail(
                errors,
                strict,
                notes,
                f"parameter {key!r} has shape {tuple(shape)} in the checkpoint but {tuple(p.param.shape)} in the "
                "optimizer",
            )
            continue
        dtype = rec.dtype
        if dtype is not None and dtype != dtype_name(p.param.dtype):
            fail(
                errors,
                strict,
                notes,
                f"parameter {key!r} is {dtype} in the checkpoint but {dtype_name(p.param.dtype)} in the optimizer",
            )
        # if the live optimizer already has state for this parameter, the saved one must look alike
        live_state = live_sd["state"].get(p.index)
        saved_state = rec.state
        if live_state and saved_state is not None:
            differences = []
            if set(live_state) != set(saved_state):
                differences.append(
                    f"state of parameter {key!r} has keys {sorted(saved_state)} in the checkpoint but "
                    f"{sorted(live_state)} in the optimizer"
                )
            for k, node in saved_state.items():
                value = live_state.get(k)
                node_shape = tuple(node.shape) if isinstance(node, (TensorEntry, torch.Tensor)) else None
                if (
                    isinstance(value, torch.Tensor)
                    and node_shape is not None
                    and node_shape != tuple(value.shape)
                ):
                    differences.append(
                        f"state {k!r} of parameter {key!r} has shape {node_shape} in the checkpoint "
                        f"but {tuple(value.shape)} in the optimizer"
                    )
            if differences:
                mismatched.append(key)
                for message in differences:
                    fail(errors, strict, notes, message)
                continue
        plan[p.index] = key
    raise_errors(errors, saved.source)
    lists = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    return plan, _group_map(pairs, len(saved_groups), len(live), by_name, notes), lists


def _group_map(
    pairs: list[tuple[_Live, str, SavedParam, int]],
    saved: int,
    live: int,
    by_name: bool,
    notes: list[str],
) -> list[int] | None:
    """The saved group whose hyperparameters each live group takes: the one holding its parameters (when they
    are matched by name), else the one at the same position; None when groups cannot be paired one to one."""
    if saved != live:
        return None
    if not by_name:
        return list(range(live))
    sources: list[set[int]] = [set() for _ in range(live)]
    for p, _key, _rec, g in pairs:
        sources[p.group].add(g)
    mapping = [next(iter(src)) if len(src) == 1 else lg for lg, src in enumerate(sources)]
    if any(len(src) > 1 for src in sources) or sorted(mapping) != list(range(live)):
        notes.append(
            "the checkpoint's param groups hold other sets of parameters than the optimizer's: "
            "hyperparameters not restored"
        )
        return None
    return mapping
