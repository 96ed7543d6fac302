"""Helpers shared across hf_optim's modules (public names in a private module)."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, overload

import torch
from torch import nn

__all__ = [
    "finite_number",
    "is_hub_url",
    "non_negative_int",
    "parameters_of",
    "restored_on_error",
    "snapshot",
    "unwrap_engine",
    "unwrap_optimizer",
    "unwrap_scheduler",
]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer, looking through wrappers such as accelerate's ``AcceleratedOptimizer``.

    Wrappers keep the real one in ``.optimizer``: accelerate's ``AcceleratedOptimizer`` (an ``Optimizer``
    subclass), and under DeepSpeed its wrapper around the ZeRO optimizer, which drives the client optimizer
    (neither of the last two is an ``Optimizer``): the innermost ``Optimizer`` of the chain is returned.
    """
    inner = optimizer
    current = optimizer
    for _ in range(8):
        wrapped = getattr(current, "optimizer", None)
        if wrapped is None or wrapped is current:
            break
        current = wrapped
        if isinstance(current, torch.optim.Optimizer):
            inner = current
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return inner


def unwrap_engine(model: Any) -> Any:
    """The user's module inside a DeepSpeed engine (``engine.module``), whatever its ZeRO stage, so that the
    parameters are named as in the model (as DeepSpeed's own checkpoints name them); any other model as it is."""
    inner = getattr(model, "module", None)
    if callable(getattr(model, "zero_optimization_stage", None)) and isinstance(inner, torch.nn.Module):
        return inner
    return model


def unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler itself, looking through accelerate's ``AcceleratedScheduler``."""
    inner = getattr(scheduler, "scheduler", None)
    if inner is not None and hasattr(inner, "state_dict") and not hasattr(scheduler, "base_lrs"):
        return inner
    return scheduler


def clean_subfolder(subfolder: str | None) -> str | None:
    """``subfolder`` as a ``/``-separated relative path (None for none); the same rules for local folders and Hub
    repositories: a relative path inside the checkpoint's root, no ``.`` or ``..`` parts."""
    if subfolder is None:
        return None
    if not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a string, got {type(subfolder).__name__}")
    cleaned = subfolder.replace("\\", "/").strip("/")
    if not cleaned:
        return None
    if any(part in ("", ".", "..") for part in cleaned.split("/")) or os.path.isabs(subfolder):
        raise ValueError(f"subfolder must be a relative path inside the checkpoint's root, got {subfolder!r}")
    return cleaned


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


@overload
def non_negative_int(
    value: Any, argument: str, *, optional: Literal[False] = False, positive: bool = False
) -> int: ...
@overload
def non_negative_int(value: Any, argument: str, *, optional: bool, positive: bool = False) -> int | None: ...
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
    value = int(value) if isinstance(value, numbers.Integral) else int(float(value))
    if value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{argument} must be {kind} integer, got {value}")
    return value


@overload
def finite_number(
    value: Any,
    argument: str,
    *,
    optional: Literal[False] = False,
    minimum: float | None = None,
    strict: bool = False,
) -> float: ...
@overload
def finite_number(
    value: Any, argument: str, *, optional: bool, minimum: float | None = None, strict: bool = False
) -> float | None: ...
def finite_number(
    value: Any, argument: str, *, optional: bool = False, minimum: float | None = None, strict: bool = False
) -> float | None:
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


def snapshot(
    opt: torch.optim.Optimizer | None = None, scheduler: Any = None, accumulator: Any = None
) -> Callable[[], None]:
    """Remember the optimizer, scheduler and accumulator as they are; the returned function puts them back.

    ``load_state_dict`` replaces the optimizer's ``state`` and ``param_groups`` with new objects: the originals
    (down to each parameter's state dict) are put back as they were. The scheduler's and the accumulator's values
    go back through their ``load_state_dict``, then their attributes by identity (``scheduler.optimizer``, the
    schedule functions, the accumulator's buffers and flags).
    """
    old_state = opt.state if opt is not None else None
    old_groups = opt.param_groups if opt is not None else []
    entries = {p: (d, dict(d)) for p, d in old_state.items()} if old_state is not None else {}
    groups = [dict(g) for g in old_groups]
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    objects = [
        (obj, copy.deepcopy(obj.state_dict()), dict(obj.__dict__))
        for obj in (inner, accumulator)
        if obj is not None
    ]

    def restore() -> None:
        if opt is not None and old_state is not None:
            old_state.clear()
            for p, (d, content) in entries.items():
                d.clear()
                d.update(content)
                old_state[p] = d
            for live, saved in zip(old_groups, groups, strict=True):
                live.clear()
                live.update(saved)
            opt.__dict__.update(state=old_state, param_groups=old_groups)
        for (
            obj,
            state,
            attrs,
        ) in objects:  # values through load_state_dict (buffers copied back), then attributes
            obj.load_state_dict(state)
            obj.__dict__.clear()
            obj.__dict__.update(attrs)

    return restore


@contextlib.contextmanager
def restored_on_error(
    opt: torch.optim.Optimizer, scheduler: Any = None, accumulator: Any = None
) -> Iterator[None]:
    """Undo whatever the block changed in the optimizer, scheduler and accumulator if it raises (a load that
    failed while applying state leaves them exactly as they were; see :func:`snapshot`)."""
    restore = snapshot(opt, scheduler, accumulator)
    try:
        yield
    except BaseException:
        restore()
        raise
