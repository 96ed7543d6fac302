"""The optimization API of pytorch-pretrained-bert 0.6.2, backed by hf_optim.

``from pytorch_pretrained_bert.optimization import BertAdam, WarmupLinearSchedule`` becomes
``from hf_optim.legacy.pytorch_pretrained_bert import BertAdam, WarmupLinearSchedule``; the names of
``optimization.py`` and ``optimization_openai.py`` are all here, with the same arguments and results.

``BertAdam`` and ``OpenAIAdam`` here default to ``foreach=False, fused=False``: the per-tensor path that gives the
old package's numbers bit for bit. ``hf_optim.BertAdam`` / ``hf_optim.OpenAIAdam`` keep the fast default (the same
math, rounded differently in the last bits); pass ``foreach=None`` here to get it.
"""

from __future__ import annotations

from torch.optim.optimizer import ParamsT

from hf_optim.optimizers.bert_adam import BertAdam as FastBertAdam
from hf_optim.optimizers.openai_adam import OpenAIAdam as FastOpenAIAdam
from hf_optim.schedules.pretrained_bert import (
    SCHEDULES,
    ConstantLR,
    LRSchedule,
    WarmupConstantSchedule,
    WarmupCosineSchedule,
    WarmupCosineWithHardRestartsSchedule,
    WarmupCosineWithWarmupRestartsSchedule,
    WarmupLinearSchedule,
)

_LRSchedule = LRSchedule  # the legacy name of the base class

__all__ = [
    "SCHEDULES",
    "BertAdam",
    "ConstantLR",
    "LRSchedule",
    "OpenAIAdam",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupCosineWithWarmupRestartsSchedule",
    "WarmupLinearSchedule",
    "_LRSchedule",
]


class BertAdam(FastBertAdam):
    """:class:`hf_optim.BertAdam` with the exact (per-tensor) path as default: 0.6.2's numbers bit for bit."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        warmup: float = -1,
        t_total: int = -1,
        schedule: str | LRSchedule | None = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        *,
        foreach: bool | None = False,
        fused: bool | None = False,
    ) -> None:
        super().__init__(
            params, lr, warmup, t_total, schedule, b1, b2, e, weight_decay, max_grad_norm,
            foreach=foreach, fused=fused,
        )  # fmt: skip


class OpenAIAdam(FastOpenAIAdam):
    """:class:`hf_optim.OpenAIAdam` with the exact (per-tensor) path as default: 0.6.2's numbers bit for bit."""

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        schedule: str | LRSchedule | None = "warmup_linear",
        warmup: float = -1,
        t_total: int = -1,
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-8,
        weight_decay: float = 0,
        vector_l2: bool = False,
        max_grad_norm: float = -1,
        *,
        foreach: bool | None = False,
        fused: bool | None = False,
    ) -> None:
        super().__init__(
            params, lr, schedule, warmup, t_total, b1, b2, e, weight_decay, vector_l2, max_grad_norm,
            foreach=foreach, fused=fused,
        )  # fmt: skip
