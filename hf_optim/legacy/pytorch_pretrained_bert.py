"""The optimization API of pytorch-pretrained-bert 0.6.2, backed by hf_optim.

``from pytorch_pretrained_bert.optimization import BertAdam, WarmupLinearSchedule`` becomes
``from hf_optim.legacy.pytorch_pretrained_bert import BertAdam, WarmupLinearSchedule``; the names of
``optimization.py`` and ``optimization_openai.py`` are all here, with the same arguments and results.
"""

from hf_optim.optimizers.bert_adam import (
    SCHEDULES,
    BertAdam,
    ConstantLR,
    LRSchedule,
    WarmupConstantSchedule,
    WarmupCosineSchedule,
    WarmupCosineWithHardRestartsSchedule,
    WarmupCosineWithWarmupRestartsSchedule,
    WarmupLinearSchedule,
)
from hf_optim.optimizers.openai_adam import OpenAIAdam

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
