"""hf_optim: legacy-exact optimizers, schedules and safetensors optimizer state for the Hugging Face ecosystem.

The core (optimizers, schedules, accumulation, serialization) depends only on torch, safetensors and
huggingface_hub. Integrations with transformers and accelerate are loaded lazily on first attribute access,
so ``import hf_optim`` never imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# --- optimizers (issue 2) ---
from hf_optim.optimizers import AdamW, AdamWeightDecay, adam_weight_decay, adamw

# --- schedules, registry, accumulation (issue 3) ---

# --- serialization and Hub (issue 4) ---

# --- lazily imported integrations (issues 5 and 6): name -> module ---
_LAZY: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
