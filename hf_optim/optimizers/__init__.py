"""Optimizers: one file per algorithm, shared kernels in ``_kernels.py``."""

from hf_optim.optimizers.adam_weight_decay import AdamWeightDecay, adam_weight_decay
from hf_optim.optimizers.adamw import AdamW, adamw

__all__ = ["AdamW", "AdamWeightDecay", "adam_weight_decay", "adamw"]
