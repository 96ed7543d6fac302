"""Optimizers: one file per algorithm, shared kernels in ``_kernels.py``."""

from hf_optim.optimizers.adam_weight_decay import AdamWeightDecay, adam_weight_decay
from hf_optim.optimizers.adamw import AdamW, adamw
from hf_optim.optimizers.bert_adam import BertAdam, bert_adam
from hf_optim.optimizers.openai_adam import OpenAIAdam, openai_adam

__all__ = [
    "AdamW",
    "AdamWeightDecay",
    "BertAdam",
    "OpenAIAdam",
    "adam_weight_decay",
    "adamw",
    "bert_adam",
    "openai_adam",
]
