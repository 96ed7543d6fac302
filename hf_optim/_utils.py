"""Helpers shared across hf_optim's modules (public names in a private module)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_hub_url", "unwrap_optimizer", "unwrap_scheduler"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer, looking through wrappers such as accelerate's ``AcceleratedOptimizer``.

    Wrappers (themselves ``Optimizer`` subclasses in accelerate's case) keep the real one in ``.optimizer``.
    """
    inner = optimizer
    for _ in range(8):
        wrapped = getattr(inner, "optimizer", None)
        if not isinstance(wrapped, torch.optim.Optimizer) or wrapped is inner:
            break
        inner = wrapped
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return inner


def unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler itself, looking through accelerate's ``AcceleratedScheduler``."""
    inner = getattr(scheduler, "scheduler", None)
    if inner is not None and hasattr(inner, "state_dict") and not hasattr(scheduler, "base_lrs"):
        return inner
    return scheduler


def is_hub_url(value: str) -> bool:
    """Whether ``value`` is a URL (``hf://`` or http(s)) rather than a local path or a repo id."""
    return value.startswith(("hf://", "https://", "http://"))
