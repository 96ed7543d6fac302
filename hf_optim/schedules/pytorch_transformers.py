"""The ``LambdaLR`` schedules of pytorch-transformers 1.x (``optimization.py``), with the legacy multipliers.

They take step counts (not fractions, unlike :mod:`hf_optim.schedules.pretrained_bert`); the multiplier is a
method, so ``state_dict()`` / ``load_state_dict()`` round-trip. Re-exported by
:mod:`hf_optim.legacy.pytorch_transformers`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "ConstantLRSchedule",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupLinearSchedule",
]


class ConstantLRSchedule(LambdaLR):
    """Multiplier 1 at every step."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        return 1.0


class WarmupConstantSchedule(LambdaLR):
    """Linear warmup from 0 to 1 over ``warmup_steps`` steps, then 1."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_epoch: int = -1) -> None:
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1.0, self.warmup_steps))
        return 1.0


class WarmupLinearSchedule(LambdaLR):
    """Linear warmup from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``t_total`` (0 after)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, t_total: int, last_epoch: int = -1) -> None:
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        return max(0.0, float(self.t_total - step) / float(max(1.0, self.t_total - self.warmup_steps)))


class WarmupCosineSchedule(LambdaLR):
    """Linear warmup over ``warmup_steps``, then ``cycles`` (0.5: a half) cosine periods down to 0 at ``t_total``."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, t_total: int, cycles: float = 0.5, last_epoch: int = -1
    ) -> None:
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        self.cycles = cycles
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1.0, self.warmup_steps))
        progress = float(step - self.warmup_steps) / float(max(1, self.t_total - self.warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(self.cycles) * 2.0 * progress)))


class WarmupCosineWithHardRestartsSchedule(LambdaLR):
    """Linear warmup over ``warmup_steps``, then ``cycles`` cosine decays from 1 to 0 with hard restarts."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, t_total: int, cycles: float = 1.0, last_epoch: int = -1
    ) -> None:
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        self.cycles = cycles
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        progress = float(step - self.warmup_steps) / float(max(1, self.t_total - self.warmup_steps))
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(self.cycles) * progress) % 1.0))))
