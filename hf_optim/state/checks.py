"""Checks of decoded checkpoint values against the live objects, before anything is applied.

Hyperparameters must have the live group's keys and value types and pass the optimizer's own construction
checks; scheduler state must have the live scheduler's keys, types and list lengths; optimizer state tensors must
fit their parameter. Violations are :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import torch

from hf_optim.errors import CheckpointError

__all__ = [
    "check_hyperparameters",
    "check_param_state",
    "check_same_structure",
    "check_scheduler_state",
    "expected_state_keys",
]

#: state entries that are tensors shaped like their parameter when present
TENSOR_STATE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_NON_NEGATIVE = ("lr", "eps", "weight_decay", "momentum", "dampening", "initial_lr", "learning_rate")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_same_structure(saved: Any, live: Any, where: str, *, none_is_unset: bool = False) -> None:
    """``saved`` has ``live``'s type structure: same dict keys, same list / tuple lengths, numbers for numbers.

    An int may stand for a float and vice versa (``1.0`` vs ``1``), a one-element tensor for a number, never a
    bool for a number. Where the live value is None, ``none_is_unset=True`` (hyperparameters: None means "not
    set") accepts None or a plain scalar (bool, number, string; never a tensor or container), otherwise only
    None.
    """
    stack = [(saved, live, where)]
    while stack:
        s, v, at = stack.pop()
        if v is None:
            if s is not None and not (none_is_unset and (isinstance(s, (bool, str)) or _is_number(s))):
                expected = "None, a bool, a number or a string" if none_is_unset else "None"
                raise CheckpointError(f"{at}: expected {expected}, got {_describe(s)}")
        elif isinstance(v, bool):
            if not isinstance(s, bool):
                raise CheckpointError(f"{at}: expected a bool, got {_describe(s)}")
        elif _is_number(v):
            if not (_is_number(s) or (isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_complex())):
                raise CheckpointError(f"{at}: expected a number, got {_describe(s)}")
        elif isinstance(v, str):
            if not isinstance(s, str):
                raise CheckpointError(f"{at}: expected a string, got {_describe(s)}")
        elif isinstance(v, torch.Tensor):
            if not isinstance(s, torch.Tensor) and not _is_number(s):
                raise CheckpointError(f"{at}: expected a tensor, got {_describe(s)}")
            if isinstance(s, torch.Tensor) and s.shape != v.shape:
                raise CheckpointError(
                    f"{at}: expected a tensor of shape {tuple(v.shape)}, got {tuple(s.shape)}"
                )
        elif isinstance(v, (list, tuple)):
            if type(s) is not type(v) or len(s) != len(v):
                raise CheckpointError(
                    f"{at}: expected a {type(v).__name__} of length {len(v)}, got {_describe(s)}"
                )
            stack.extend((a, b, f"{at}[{i}]") for i, (a, b) in enumerate(zip(s, v, strict=True)))
        elif isinstance(v, Mapping):
            if not isinstance(s, Mapping) or set(s) != set(v):
                keys = sorted(map(str, s)) if isinstance(s, Mapping) else _describe(s)
                raise CheckpointError(f"{at}: expected keys {sorted(map(str, v))}, got {keys}")
            stack.extend((s[k], v[k], f"{at}[{k!r}]") for k in v)
        # other live types (callables, objects): nothing to compare against


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {str(value)[:50]}"


def _value_checks(key: str, value: Any, live: Any, where: str) -> None:
    """Bounds torch's optimizers check at construction, for the common hyperparameters where the live value has
    the usual type (a number; betas a pair of numbers): other optimizers may use these names differently."""
    if key in _NON_NEGATIVE and (_is_number(live) or isinstance(live, torch.Tensor)):
        number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if not _is_number(number) or math.isnan(number) or number < 0:
            raise CheckpointError(f"{where}: {key} must be a non-negative number, got {str(value)[:50]}")
    if (
        key == "betas"
        and isinstance(live, tuple)
        and len(live) == 2
        and not (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and all(_is_number(b) and 0.0 <= b < 1.0 for b in value)
        )
    ):
        raise CheckpointError(f"{where}: betas must be two numbers in [0, 1), got {str(value)[:50]}")


def check_hyperparameters(
    optimizer: torch.optim.Optimizer,
    group_index: int,
    saved: Mapping[str, Any],
    live: Mapping[str, Any],
    where: str,
    *,
    strict: bool,
    notes: list[str],
) -> dict[str, Any]:
    """The saved hyperparameters to apply to live group ``group_index``, after checking them.

    Keys the live group lacks are an error with ``strict=True`` and dropped (noted) otherwise.
    """
    added = sorted(set(saved) - set(live))
    if added:
        if strict:
            raise CheckpointError(f"{where}: hyperparameters the optimizer does not have: {added}")
        notes.append(
            f"param group {group_index}: ignored hyperparameters the optimizer does not have: {added}"
        )
    out = {k: v for k, v in saved.items() if k in live}
    for key, value in out.items():
        check_same_structure(value, live[key], f"{where}: hyperparameter {key!r}", none_is_unset=True)
        _value_checks(key, value, live[key], where)
    _construct_check(optimizer, out, where)
    return out


def _construct_check(optimizer: torch.optim.Optimizer, hyper: Mapping[str, Any], where: str) -> None:
    """Build a throwaway optimizer of the same class with the saved values its constructor accepts."""
    try:
        parameters = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - C-implemented constructors
        return
    kwargs = {
        k: v
        for k, v in hyper.items()
        if k in parameters and k not in ("self", "params") and not isinstance(v, torch.Tensor)
    }
    if not kwargs:
        return
    dummy = torch.zeros(1, requires_grad=True)
    try:
        type(optimizer)([dummy], **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"{where}: hyperparameters refused by {type(optimizer).__name__}: {err}"
        ) from None
    except Exception:  # pragma: no cover - a constructor needing more than hyperparameters: not checkable
        return


_LR_KEY = re.compile(r"(?:^|_)lrs?$", re.IGNORECASE)


def _names_lr(key: Any) -> bool:
    """``base_lrs``, ``_last_lr``, ``min_lrs``, ``max_lr``...: a key whose values are learning rates."""
    return isinstance(key, str) and _LR_KEY.search(key) is not None


def check_scheduler_state(
    saved: Mapping[str, Any], live: Mapping[str, Any], group_keys: set[str], where: str
) -> None:
    """Values of a scheduler's state that its ``step()`` turns into learning rates, checked after
    :func:`check_same_structure`: no NaN anywhere; the numbers under a key naming learning rates (``base_lrs``,
    ``_last_lr``, ``max_lrs``...) finite and non-negative; ``last_epoch`` an int >= -1 and
    ``_step_count`` an int >= 0; a string that names a param-group key (OneCycleLR's phases) or differs from the
    live scheduler's equal to the live value (schedulers use such strings as keys or modes)."""
    for key in ("last_epoch", "_step_count"):
        if key in saved:
            value, low = saved[key], -1 if key == "last_epoch" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CheckpointError(f"{where}: {key} must be an int >= {low}, got {str(value)[:50]}")
    stack = [(v, live.get(k), f"{where}[{k!r}]", _names_lr(k)) for k, v in saved.items()]
    while stack:
        s, v, at, is_lr = stack.pop()
        if isinstance(s, Mapping):
            stack.extend(
                (
                    s[k],
                    v.get(k) if isinstance(v, Mapping) else None,
                    f"{at}[{k!r}]",
                    is_lr or _names_lr(k),
                )
                for k in s
            )
        elif isinstance(s, (list, tuple)):
            stack.extend(
                (item, v[i] if isinstance(v, (list, tuple)) and i < len(v) else None, f"{at}[{i}]", is_lr)
                for i, item in enumerate(s)
            )
        elif isinstance(s, str):
            if s != v and (s in group_keys or isinstance(v, str)):
                raise CheckpointError(f"{at}: expected {v!r} (the scheduler's own value), got {s[:50]!r}")
        elif _is_number(s) or isinstance(s, torch.Tensor):
            numbers = s.detach().flatten().tolist() if isinstance(s, torch.Tensor) else [s]
            for number in numbers:
                if isinstance(number, complex) or math.isnan(number):
                    raise CheckpointError(f"{at}: not a number ({str(number)[:50]})")
                if is_lr and not isinstance(number, bool) and (math.isinf(number) or number < 0):
                    raise CheckpointError(
                        f"{at}: a learning rate must be finite and non-negative, got {str(number)[:50]}"
                    )


def expected_state_keys(
    optimizer: torch.optim.Optimizer, hyperparameters: Mapping[str, Any], param: torch.Tensor
) -> frozenset[str] | None:
    """The state keys ``optimizer`` keeps for ``param`` after a step, for torch's own optimizers: found by
    stepping a throwaway optimizer of the same class and hyperparameters on a small parameter of the same dtype.
    None when that cannot be determined (other optimizers check the keys in their own ``load_state_dict``)."""
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim."):
        return None
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - C-implemented constructors
        return None
    kwargs = {
        k: v
        for k, v in hyperparameters.items()
        if k in parameters and k not in ("self", "params") and not isinstance(v, torch.Tensor)
    }
    dummy = torch.zeros(2, dtype=param.dtype, requires_grad=True)
    dummy.grad = torch.ones_like(dummy)
    try:
        throwaway = cls([dummy], **kwargs)
        throwaway.step()
    except Exception:  # a step that needs more (a closure, a device): not checkable this way
        return None
    return frozenset(throwaway.state.get(dummy, {}))


def _check_step(value: Any, at: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise CheckpointError(
                f"{at}: a step counter must be a real scalar, got {value.dtype} {list(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype == torch.int64):
            raise CheckpointError(f"{at}: a step counter must be a float or int64 scalar, got {value.dtype}")
        number = value.item()
    elif _is_number(value):
        number = value
    else:
        raise CheckpointError(f"{at}: a step counter must be a number, got {_describe(value)}")
    try:
        finite = math.isfinite(float(number))
    except OverflowError:
        finite = False
    if not finite or number < 0 or number >= 2**63:
        raise CheckpointError(
            f"{at}: a step counter must be a finite number in [0, 2**63), got {str(number)[:50]}"
        )


def check_param_state(
    key: str,
    saved: Mapping[str, Any],
    param: torch.Tensor,
    live: Mapping[str, Any] | None,
    where: str,
    *,
    expected_keys: frozenset[str] | None = None,
) -> None:
    """Saved state for one parameter fits it: moments (:data:`TENSOR_STATE`) are tensors of its shape, every
    non-scalar state tensor has a floating dtype (complex only for a complex parameter), a step counter is a
    finite non-negative number or a float / int64 scalar tensor. When the optimizer has no state for ``param``
    yet, ``expected_keys`` (see :func:`expected_state_keys`) must be exactly the saved keys."""
    if not live and expected_keys is not None and set(saved) != expected_keys:
        missing, unexpected = sorted(expected_keys - set(saved)), sorted(set(saved) - expected_keys)
        raise CheckpointError(
            f"{where}: the state of parameter {key!r} is not what the optimizer keeps per parameter "
            f"(missing {missing}, unexpected {unexpected})"
        )
    for name, value in saved.items():
        at = f"{where}: state {name!r} of parameter {key!r}"
        is_moment = name in TENSOR_STATE
        expected_tensor = is_moment or (live is not None and isinstance(live.get(name), torch.Tensor))
        if name == "step":
            _check_step(value, at)
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 and not is_moment:
                continue
            if is_moment and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{at} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}"
                )
            if not (value.is_floating_point() or (value.is_complex() and param.is_complex())):
                note = " (complex only for a complex parameter)" if value.is_complex() else ""
                raise CheckpointError(
                    f"{at} has dtype {value.dtype}; the optimizer steps floating state only{note}"
                )
        elif expected_tensor and not (name == "momentum_buffer" and value is None):
            raise CheckpointError(f"{at} must be a tensor, got {_describe(value)}")
