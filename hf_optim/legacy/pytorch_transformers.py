"""The optimization API of pytorch-transformers 1.x, backed by hf_optim.

``from pytorch_transformers import AdamW, WarmupLinearSchedule`` becomes
``from hf_optim.legacy.pytorch_transformers import AdamW, WarmupLinearSchedule``. The schedules
(:mod:`hf_optim.schedules.pytorch_transformers`) are ``LambdaLR`` subclasses taking step counts (not fractions),
with the legacy multipliers. ``AdamW`` is :class:`hf_optim.AdamW` with the exact (per-tensor) path as default,
``foreach=False, fused=False``: the old package's numbers bit for bit; pass ``foreach=None`` for the fast path.
"""

from __future__ import annotations

from torch.optim.optimizer import ParamsT

from hf_optim.optimizers.adamw import AdamW as FastAdamW
from hf_optim.schedules.pytorch_transformers import (
    ConstantLRSchedule,
    WarmupConstantSchedule,
    WarmupCosineSchedule,
    WarmupCosineWithHardRestartsSchedule,
    WarmupLinearSchedule,
)

__all__ = [
    "AdamW",
    "ConstantLRSchedule",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupLinearSchedule",
]


class AdamW(FastAdamW):
    """:class:`hf_optim.AdamW` with the exact (per-tensor) path as default: pytorch-transformers 1.x's numbers."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        foreach: bool | None = False,
        fused: bool | None = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, foreach=foreach, fused=fused)
