"""Helpers shared across hf_optim's modules (public names in a private module)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "finite_number",
    "is_hub_url",
    "non_negative_int",
    "parameters_of",
    "unwrap_optimizer",
    "unwrap_scheduler",
]


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


def parameters_of(
    params_or_model: nn.Module | Iterable[Any], argument: str = "params_or_model"
) -> list[torch.Tensor]:
    """Parameters of a module, or of an iterable of tensors / (name, tensor) pairs / param-group dicts, in order.

    Accepts everything ``torch.optim.Optimizer`` accepts as ``params``; ``ValueError`` naming ``argument``
    otherwise (a single tensor included, which torch rejects too).
    """
    if isinstance(params_or_model, nn.Module):
        return list(params_or_model.parameters())
    if isinstance(params_or_model, torch.Tensor):
        raise ValueError(f"{argument} must be an nn.Module or an iterable of parameters, got a single Tensor")
    out: list[torch.Tensor] = []
    for item in params_or_model:
        if isinstance(item, Mapping):
            out.extend(parameters_of(item["params"], argument))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append(item[1])
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise ValueError(
                f"{argument} must hold parameters, (name, parameter) pairs or param-group dicts, got {item!r}"
            )
    return out


def non_negative_int(
    value: Any, argument: str, *, optional: bool = False, positive: bool = False
) -> int | None:
    """``value`` as a Python ``int`` (integral floats and one-element tensors accepted), else ``ValueError``.

    ``optional``: ``None`` passes through; ``positive``: 0 is refused too. The message names ``argument``.
    """
    if value is None:
        if optional:
            return None
        raise ValueError(f"{argument} is required (a non-negative integer), got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{argument} must be a non-negative integer, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{argument} must be a non-negative integer, got {value!r}")
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{argument} must be a non-negative integer, got {value!r}")
    value = int(value)
    if value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{argument} must be {kind} integer, got {value}")
    return value


def finite_number(
    value: Any, argument: str, *, optional: bool = False, minimum: float | None = None, strict: bool = False
) -> int | float | None:
    """``value`` as a finite Python ``int``/``float``, else ``ValueError`` naming ``argument``.

    ``optional``: ``None`` passes through; ``minimum``: the value must be ``>= minimum`` (``> minimum`` with
    ``strict``). Booleans, NaN and infinities are refused.
    """
    if value is None:
        if optional:
            return None
        raise ValueError(f"{argument} is required (a number), got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number, got {value!r}")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{argument} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value
