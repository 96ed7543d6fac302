"""Resuming plain ``transformers.Trainer`` from a checkpoint whose optimizer state hf_optim wrote.

The start-up hook makes unmodified Trainer scripts use hf_optim's optimizers, so folders written by
``hf_optim.Trainer`` (``optimizer.safetensors`` + ``scheduler.json``, no ``optimizer.pt``) meet plain Trainer.
Its ``_load_optimizer_and_scheduler`` silently does nothing without ``optimizer.pt``: the optimizer and the
schedule would restart and the run diverge. :func:`patch_trainer_resume` wraps that method so that such a folder
is loaded with :func:`hf_optim.load_state`, or refused loudly where it cannot be (DeepSpeed, FSDP); folders with
``optimizer.pt`` go to transformers unchanged.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from hf_optim.errors import CheckpointError
from hf_optim.integrations.transformers.enums import integration_error
from hf_optim.state import (
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    SHARDED_MANIFEST_NAME,
    load_state,
)

__all__ = ["LEGACY_OPTIMIZER_NAMES", "load_hf_optim_state", "patch_trainer_resume", "resume_step"]

logger = logging.getLogger(__name__)

LEGACY_OPTIMIZER_NAMES = ("optimizer.pt", "optimizer.bin")
TRAINER_STATE_NAME = "trainer_state.json"
_PATCHED = "_hf_optim_resume"
_HF_OPTIM_FILES = (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME, SHARDED_MANIFEST_NAME)


def resume_step(checkpoint: str) -> int | None:
    """The ``global_step`` recorded in the checkpoint's ``trainer_state.json``, if it can be read."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def load_hf_optim_state(trainer: Any, checkpoint: str, *, model: Any = None) -> None:
    """Load the optimizer (and, if saved, the scheduler) state hf_optim wrote into ``checkpoint``; logs the step
    the run resumes from."""
    has_scheduler = os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME))
    if not has_scheduler and trainer.lr_scheduler is not None:
        logger.warning(
            "%s holds optimizer state but no %s: the learning-rate schedule restarts",
            checkpoint,
            SCHEDULER_NAME,
        )
    load_state(
        checkpoint, trainer.optimizer, scheduler=trainer.lr_scheduler if has_scheduler else None, model=model
    )
    step = resume_step(checkpoint)
    logger.info(
        "Resuming from %s%s: optimizer%s state loaded",
        checkpoint,
        f" at global step {step}" if step is not None else "",
        " and scheduler" if has_scheduler else "",
    )


def _wrap(original: Callable[[Any, str | None], None]) -> Callable[[Any, str | None], None]:
    @functools.wraps(original)
    def _load_optimizer_and_scheduler(self: Any, checkpoint: str | None) -> None:
        if checkpoint is None or any(
            os.path.isfile(os.path.join(checkpoint, name)) for name in LEGACY_OPTIMIZER_NAMES
        ):
            return original(self, checkpoint)
        if not any(os.path.lexists(os.path.join(checkpoint, name)) for name in _HF_OPTIM_FILES):
            return original(self, checkpoint)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise CheckpointError(
                f"{checkpoint} holds optimizer state written by hf_optim, which transformers.Trainer cannot "
                "restore under DeepSpeed or FSDP: resume with hf_optim.Trainer (a drop-in subclass)"
            )
        if os.path.lexists(os.path.join(checkpoint, SHARDED_MANIFEST_NAME)):
            raise CheckpointError(
                f"{checkpoint} holds sharded (FSDP2) optimizer state: resume with hf_optim.Trainer under FSDP2"
            )
        load_hf_optim_state(self, checkpoint)
        return None

    setattr(_load_optimizer_and_scheduler, _PATCHED, True)
    return _load_optimizer_and_scheduler


def patch_trainer_resume(trainer_module: ModuleType) -> None:
    """Make ``trainer_module.Trainer`` (``transformers.trainer``) resume from hf_optim's optimizer state.

    Idempotent. Raises :class:`~hf_optim.errors.TransformersIntegrationError` (naming the transformers version)
    if ``Trainer._load_optimizer_and_scheduler(self, checkpoint)`` is not what hf_optim expects.
    """
    trainer_cls = getattr(trainer_module, "Trainer", None)
    method = getattr(trainer_cls, "_load_optimizer_and_scheduler", None)
    if trainer_cls is None or method is None:
        raise integration_error("transformers.Trainer has no _load_optimizer_and_scheduler")
    if getattr(method, _PATCHED, False):
        return
    if list(inspect.signature(method).parameters) != ["self", "checkpoint"]:
        raise integration_error(
            f"Trainer._load_optimizer_and_scheduler takes {list(inspect.signature(method).parameters)}, "
            "not (self, checkpoint)"
        )
    trainer_cls._load_optimizer_and_scheduler = _wrap(method)
