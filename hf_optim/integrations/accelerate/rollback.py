"""Everything ``accelerate_load_state`` may change, copied before it changes anything, to put back on failure."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

__all__ = ["Snapshot"]


class Snapshot:
    """Copies of everything ``accelerate_load_state`` may change, to put back if a step fails."""

    def __init__(
        self, accelerator: Accelerator, pairs: list[tuple[Any, Any]], accumulator: Any | None
    ) -> None:
        self.accelerator = accelerator
        self.optimizers = [(opt, opt.state, opt.param_groups, _copy_optimizer(opt)) for opt, _ in pairs]
        self.schedulers = [(s, _copy_scheduler(s)) for _, s in pairs if s is not None]
        self.accumulator = (accumulator, copy.deepcopy(accumulator.state_dict())) if accumulator else None
        self.registered = [(obj, copy.deepcopy(obj.state_dict())) for obj in accelerator._custom_objects]
        self.scaler = (
            copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None
        )
        self.step = accelerator.step
        self.rng = (
            random.getstate(),
            np.random.get_state(),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        )

    def restore(self) -> None:
        for opt, state, groups, (saved_state, saved_groups) in self.optimizers:
            opt.state, opt.param_groups = state, groups  # the same objects, with their old contents
            state.clear()
            state.update(saved_state)
            groups[:] = [group for group, _ in saved_groups]
            for group, content in saved_groups:
                group.clear()
                group.update(content)
        for scheduler, saved in self.schedulers:
            scheduler.__dict__.clear()
            scheduler.__dict__.update(saved)
        if self.accumulator is not None:
            self.accumulator[0].load_state_dict(self.accumulator[1])
        for obj, saved in self.registered:
            obj.load_state_dict(saved)
        if self.scaler is not None:
            self.accelerator.scaler.load_state_dict(self.scaler)
        self.accelerator.step = self.step
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.rng[3] is not None:
            torch.cuda.set_rng_state_all(self.rng[3])


def _copy_optimizer(
    opt: torch.optim.Optimizer,
) -> tuple[dict[Any, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    memo = {id(p): p for group in opt.param_groups for p in group["params"]}  # parameters are not copied
    state = {p: copy.deepcopy(s, memo) for p, s in opt.state.items()}
    groups = [
        (group, {k: v if k == "params" else copy.deepcopy(v, memo) for k, v in group.items()})
        for group in opt.param_groups
    ]
    return state, groups


def _copy_scheduler(scheduler: Any) -> dict[str, Any]:
    memo: dict[int, Any] = {}
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is not None:
        memo[id(optimizer)] = optimizer  # the scheduler's reference to its optimizer stays a reference
    return {k: copy.deepcopy(v, memo) for k, v in scheduler.__dict__.items()}
