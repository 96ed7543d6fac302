"""Everything ``accelerate_load_state`` may change, copied before it changes anything, to put back on failure."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from hf_optim._utils import snapshot, unwrap_optimizer
from hf_optim.integrations.accelerate import internals

__all__ = ["Snapshot"]


class Snapshot:
    """Everything ``accelerate_load_state`` may change, remembered before it changes anything, to put back if a
    step fails: the optimizers, schedulers and accumulator as every hf_optim load does
    (:func:`hf_optim._utils.snapshot`), plus Accelerate's registered objects, gradient scaler, step and the
    random generators."""

    def __init__(
        self, accelerator: Accelerator, pairs: list[tuple[Any, Any]], accumulator: Any | None
    ) -> None:
        self.accelerator = accelerator
        self.restores = [snapshot(unwrap_optimizer(opt), scheduler) for opt, scheduler in pairs]
        if accumulator is not None:
            self.restores.append(snapshot(accumulator=accumulator))
        self.registered = [
            (obj, copy.deepcopy(obj.state_dict())) for obj in internals.registered_objects(accelerator)
        ]
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
        for restore in self.restores:
            restore()
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
