"""transformers integration: optimizer / schedule names for ``TrainingArguments`` and a safetensors ``Trainer``.

- :func:`register` / :func:`sync` (in :mod:`.bridge`) add hf_optim's registry names to transformers'
  ``OptimizerNames`` / ``SchedulerType`` and dispatch tables (:mod:`.enums`, :mod:`.handlers`,
  :mod:`.optim_args`), and transformers' own optimizer names to hf_optim's registry (:mod:`.provider`).
  ``import hf_optim`` and the start-up hook (``hf_optim._autoload``) call :func:`sync`; importing this package
  does not import transformers.
- :class:`Trainer` and :class:`TrainerMixin` (in :mod:`.trainer`, imported on first access because it imports
  ``transformers.Trainer``) save optimizer and scheduler state as ``optimizer.safetensors`` + ``scheduler.json``
  and resume from local folders, ``hf://`` URLs and legacy ``optimizer.pt`` checkpoints.
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_optim.errors import TransformersIntegrationError
from hf_optim.integrations.transformers.bridge import register, registered_names, sync

__all__ = ["Trainer", "TrainerMixin", "TransformersIntegrationError", "register", "registered_names", "sync"]

_TRAINER_NAMES = {"Trainer", "TrainerMixin"}


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        value = getattr(importlib.import_module("hf_optim.integrations.transformers.trainer"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
