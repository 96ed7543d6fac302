"""Learning-rate schedules with the names, signatures and exact values of ``transformers.optimization``.

Every function returns a plain :class:`torch.optim.lr_scheduler.LambdaLR` whose multiplier is a
``functools.partial`` of a module-level function (so the scheduler pickles) performing the same float operations
in the same order as transformers 5.x, hence the same learning rates bit for bit. Each scheduler also carries
``hf_optim_config = {"name": <registry name>, "kwargs": {...}}``: a JSON description from which
:func:`hf_optim.scheduler_from_config` rebuilds it without code. Because it is an instance attribute, LambdaLR's
``state_dict()`` includes it too; that dict holds only numbers, booleans, lists and strings (JSON-serialisable as
long as the optimizer's learning rates are Python floats).

The functions accept every argument combination transformers 5 accepts, with identical values, and refuse only
what transformers refuses plus what would divide by zero or give NaN (the message names the argument); step
counts are non-negative integers, as ``TrainingArguments`` requires. This module depends on torch only: building
a schedule *by name* (``get_scheduler``, ``scheduler_from_config``) lives next to the names, in
:mod:`hf_optim.registry`, and is exported as ``hf_optim.get_scheduler`` / ``hf_optim.scheduler_from_config``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from hf_optim._utils import finite_number, non_negative_int
from hf_optim.schedules._config import attach_config
from hf_optim.schedules._multipliers import (
    constant,
    constant_with_warmup,
    cosine,
    cosine_hard_restarts,
    cosine_warmup_with_min_lr,
    inverse_sqrt,
    linear,
    polynomial,
    wsd,
)

logger = logging.getLogger(__name__)

__all__ = [
    "WSD_TYPES",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_wsd_schedule",
]

WSD_TYPES = ("linear", "cosine", "1-sqrt")


def _base_lr(optimizer: Optimizer) -> float:
    try:
        return optimizer.defaults["lr"]
    except (AttributeError, KeyError, TypeError):
        raise TypeError("optimizer must be a torch.optim.Optimizer with an 'lr' default") from None


def _lambda_schedule(
    optimizer: Optimizer, name: str, multiplier: Any, last_epoch: int, **kwargs: Any
) -> LambdaLR:
    """``LambdaLR`` of ``partial(multiplier, **kwargs)``, described as ``name`` with those same arguments."""
    return attach_config(LambdaLR(optimizer, partial(multiplier, **kwargs), last_epoch), name, kwargs)


def get_constant_schedule(optimizer: Optimizer, last_epoch: int = -1) -> LambdaLR:
    """Constant learning rate: the one set in the optimizer.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_constant_schedule(optimizer)
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [1.0, 1.0, 1.0]
        ```
    """
    return attach_config(LambdaLR(optimizer, constant, last_epoch=last_epoch), "constant", {})


def get_constant_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup from 0 over ``num_warmup_steps``, then the optimizer's learning rate.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        ValueError: If a step count is not a non-negative integer.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=2)
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 0.5, 1.0]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    return _lambda_schedule(
        optimizer,
        "constant_with_warmup",
        constant_with_warmup,
        last_epoch,
        num_warmup_steps=num_warmup_steps,
    )


def get_linear_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup from 0 to the optimizer's learning rate, then linear decay to 0 at ``num_training_steps``.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        ValueError: If a step count is not a non-negative integer.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=3)
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    return _lambda_schedule(
        optimizer,
        "linear",
        linear,
        last_epoch,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then a cosine from the optimizer's learning rate to 0 (``num_cycles`` waves; 0.5 = half).

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        num_cycles: Waves of the cosine after the warmup (0.5: one half wave, down to 0).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        ValueError: If a step count is not a non-negative integer, or a number is not finite.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=3)
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    num_cycles = finite_number(num_cycles, "num_cycles")
    return _lambda_schedule(
        optimizer,
        "cosine",
        cosine,
        last_epoch,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def get_cosine_with_hard_restarts_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 1.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then ``num_cycles`` cosine decays to 0, each restarting at the optimizer's learning rate.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        num_cycles: The number of hard restarts (cosine decays) after the warmup.
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        ValueError: If a step count is not a non-negative integer, or a number is not finite.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_warmup_steps=1, num_training_steps=5, num_cycles=2
        )
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(5)] == [0.0, 1.0, 0.5, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    num_cycles = finite_number(num_cycles, "num_cycles")
    return _lambda_schedule(
        optimizer,
        "cosine_with_restarts",
        cosine_hard_restarts,
        last_epoch,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def get_polynomial_decay_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    power: float = 1.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup, then polynomial decay (``power``) from the optimizer's learning rate to ``lr_end``.

    ``lr_end`` is absolute and must be below ``optimizer.defaults["lr"]``. Refused besides what transformers
    refuses: ``num_training_steps == num_warmup_steps`` (transformers divides by the zero-length decay phase at
    that step), a negative ``power`` when the decay phase is reached (``0 ** power`` at its last step) and an
    optimizer learning rate of 0 (the multiplier divides by it).

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        lr_end: The final learning rate (absolute), below the optimizer's ``lr``.
        power: The exponent of the decay (1.0: linear).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        TypeError: If the optimizer has no ``lr`` default.
        ValueError: If a step count is not a non-negative integer, ``lr_end`` is not below the optimizer's ``lr``,
            ``num_training_steps == num_warmup_steps``, or ``power`` is negative.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=1, num_training_steps=3, lr_end=0.0, power=1.0
        )
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    if num_training_steps == num_warmup_steps:
        raise ValueError(
            f"num_training_steps ({num_training_steps}) must differ from num_warmup_steps ({num_warmup_steps}) "
            "for the polynomial schedule: its decay phase would have length 0 (a division by zero at that step)"
        )
    lr_end = finite_number(lr_end, "lr_end")
    power = finite_number(power, "power")
    if power < 0 and num_training_steps > num_warmup_steps:
        raise ValueError(
            f"power must be >= 0 (0 ** power at step num_training_steps divides by zero), got {power}"
        )
    lr_init = _base_lr(optimizer)
    if not (lr_init > lr_end):
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")
    if lr_init == 0:
        raise ValueError("the optimizer's lr must not be 0 for the polynomial schedule (it divides by it)")
    lr_lambda = partial(
        polynomial,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        lr_end=lr_end,
        power=power,
        lr_init=lr_init,
    )
    return attach_config(
        LambdaLR(optimizer, lr_lambda, last_epoch),
        "polynomial",
        {
            "num_warmup_steps": num_warmup_steps,
            "num_training_steps": num_training_steps,
            "lr_end": lr_end,
            "power": power,
        },
    )


def get_inverse_sqrt_schedule(
    optimizer: Optimizer, num_warmup_steps: int, timescale: int | None = None, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup, then ``1 / sqrt((step + timescale - num_warmup_steps) / timescale)``.

    ``timescale`` defaults to ``num_warmup_steps`` (10 000 when that is 0), as in transformers.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        timescale: The decay's time scale; ``None``: ``num_warmup_steps`` (10 000 when that is 0).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        ValueError: If a step count is not a non-negative integer.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=1, timescale=1)
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 1.0, 0.707107]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    given_timescale = non_negative_int(timescale, "timescale", optional=True, positive=True)
    timescale = given_timescale if given_timescale is not None else (num_warmup_steps or 10_000)
    lr_lambda = partial(inverse_sqrt, num_warmup_steps=num_warmup_steps, timescale=timescale)
    return attach_config(
        LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch),
        "inverse_sqrt",
        {"num_warmup_steps": num_warmup_steps, "timescale": given_timescale},
    )


def _min_lr_rate(optimizer: Optimizer, min_lr: float | None, min_lr_rate: float | None) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("Only one of min_lr or min_lr_rate should be set")
    if min_lr is not None:
        lr = _base_lr(optimizer)
        if lr == 0:
            raise ValueError("min_lr needs an optimizer lr other than 0 (min_lr_rate = min_lr / lr)")
        return min_lr / lr
    if min_lr_rate is None:
        raise ValueError("One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`")
    return min_lr_rate


def get_cosine_with_min_lr_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
) -> LambdaLR:
    """Like the cosine schedule but decaying to ``min_lr`` (absolute) or ``min_lr_rate`` (fraction of the lr).

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        num_cycles: Waves of the cosine after the warmup (0.5: one half wave).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.
        min_lr: The learning rate the cosine ends at (absolute); give this or ``min_lr_rate``.
        min_lr_rate: The final learning rate as a fraction of the optimizer's; give this or ``min_lr``.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        TypeError: If ``min_lr`` is given and the optimizer has no ``lr`` default.
        ValueError: If a step count is not a non-negative integer, a number is not finite, or not exactly one of
            ``min_lr`` and ``min_lr_rate`` is given.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=1, num_training_steps=3, min_lr_rate=0.1
        )
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.0, 1.0, 0.55]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    num_cycles = finite_number(num_cycles, "num_cycles")
    min_lr = finite_number(min_lr, "min_lr", optional=True)
    min_lr_rate = finite_number(min_lr_rate, "min_lr_rate", optional=True)
    rate = _min_lr_rate(optimizer, min_lr, min_lr_rate)
    lr_lambda = partial(
        cosine,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr_rate=rate,
    )
    return attach_config(
        LambdaLR(optimizer, lr_lambda, last_epoch),
        "cosine_with_min_lr",
        {
            "num_warmup_steps": num_warmup_steps,
            "num_training_steps": num_training_steps,
            "num_cycles": num_cycles,
            "min_lr": min_lr,
            "min_lr_rate": min_lr_rate,
        },
    )


def get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    min_lr: float | None = None,
    min_lr_rate: float | None = None,
    warmup_lr_rate: float | None = None,
) -> LambdaLR:
    """transformers' ``cosine_warmup_with_min_lr``: warmup starting at ``warmup_lr_rate`` (or ``1/num_warmup``),

    cosine to ``min_lr`` / ``min_lr_rate``, with transformers' one-step shift (step ``t`` uses ``t + 1``).

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_training_steps: Total number of training steps (a non-negative integer).
        num_cycles: Waves of the cosine after the warmup (0.5: one half wave).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.
        min_lr: The learning rate the cosine ends at (absolute); give this or ``min_lr_rate``.
        min_lr_rate: The final learning rate as a fraction of the optimizer's; give this or ``min_lr``.
        warmup_lr_rate: The multiplier of the first warmup step; ``None``: ``1 / num_warmup_steps``.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        TypeError: If ``min_lr`` is given and the optimizer has no ``lr`` default.
        ValueError: If a step count is not a non-negative integer, a number is not finite, or not exactly one of
            ``min_lr`` and ``min_lr_rate`` is given.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
            optimizer, num_warmup_steps=2, num_training_steps=4, min_lr_rate=0.0
        )
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(3)] == [0.5, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps")
    num_cycles = finite_number(num_cycles, "num_cycles")
    min_lr = finite_number(min_lr, "min_lr", optional=True)
    min_lr_rate = finite_number(min_lr_rate, "min_lr_rate", optional=True)
    warmup_lr_rate = finite_number(warmup_lr_rate, "warmup_lr_rate", optional=True)
    rate = _min_lr_rate(optimizer, min_lr, min_lr_rate)
    lr_lambda = partial(
        cosine_warmup_with_min_lr,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
        min_lr_rate=rate,
        warmup_lr_rate=warmup_lr_rate,
    )
    return attach_config(
        LambdaLR(optimizer, lr_lambda, last_epoch),
        "cosine_warmup_with_min_lr",
        {
            "num_warmup_steps": num_warmup_steps,
            "num_training_steps": num_training_steps,
            "num_cycles": num_cycles,
            "min_lr": min_lr,
            "min_lr_rate": min_lr_rate,
            "warmup_lr_rate": warmup_lr_rate,
        },
    )


def get_wsd_schedule(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_decay_steps: int,
    num_training_steps: int | None = None,
    num_stable_steps: int | None = None,
    warmup_type: str = "linear",
    decay_type: str = "cosine",
    min_lr_ratio: float = 0,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
    *,
    warmup_from_zero: bool = False,
) -> LambdaLR:
    """Warmup-stable-decay: warmup (``warmup_type``) from ``min_lr_ratio``, a constant phase, then a decay

    (``decay_type``) back to ``min_lr_ratio`` of the learning rate, which is kept afterwards.

    The stable phase lasts ``num_stable_steps``, or ``num_training_steps - num_warmup_steps - num_decay_steps``.
    These are transformers 5.x's values. ``warmup_from_zero=True`` gives transformers 4.x's (before
    ``warmup_type`` existed): a linear warmup from 0 instead of from ``min_lr_ratio``; the rest is the same.

    Args:
        optimizer: The optimizer whose learning rates the schedule multiplies.
        num_warmup_steps: Steps of the warmup phase (a non-negative integer).
        num_decay_steps: Steps of the decay phase.
        num_training_steps: Total number of training steps (a non-negative integer).
        num_stable_steps: Steps of the constant phase; ``None``: what ``num_training_steps`` leaves.
        warmup_type: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        decay_type: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.
        min_lr_ratio: The multiplier at the start of the warmup and the end of the decay.
        num_cycles: Waves of a cosine decay (0.5: one half wave).
        last_epoch: The index of the last step when resuming; -1 starts from scratch.
        warmup_from_zero: transformers 4.x's linear warmup from 0 instead of from ``min_lr_ratio``.

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` with ``hf_optim_config`` set (its name and arguments as JSON).

    Raises:
        TypeError: If ``warmup_from_zero`` is not a bool.
        ValueError: If a step count is not a non-negative integer, neither ``num_training_steps`` nor
            ``num_stable_steps`` is given, a type is unknown, or ``warmup_from_zero`` with a non-linear warmup.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = hf_optim.get_wsd_schedule(
            optimizer, num_warmup_steps=1, num_decay_steps=2, num_stable_steps=1, decay_type="linear"
        )
        assert [round(scheduler.lr_lambdas[0](step), 6) for step in range(4)] == [0.0, 1.0, 1.0, 0.5]
        ```
    """
    num_warmup_steps = non_negative_int(num_warmup_steps, "num_warmup_steps")
    num_decay_steps = non_negative_int(num_decay_steps, "num_decay_steps")
    num_training_steps = non_negative_int(num_training_steps, "num_training_steps", optional=True)
    num_stable_steps = non_negative_int(num_stable_steps, "num_stable_steps", optional=True)
    if num_training_steps is None and num_stable_steps is None:
        raise ValueError("Either num_training_steps or num_stable_steps must be specified.")
    if num_training_steps is not None and num_stable_steps is not None:
        logger.warning(
            "Both num_training_steps and num_stable_steps are specified. num_stable_steps will be used."
        )
    for argument, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in WSD_TYPES:
            raise ValueError(
                f"Unknown {argument}: {value!r}, expected one of {', '.join(map(repr, WSD_TYPES))}"
            )
    min_lr_ratio = finite_number(min_lr_ratio, "min_lr_ratio")
    num_cycles = finite_number(num_cycles, "num_cycles")
    if not isinstance(warmup_from_zero, bool):
        raise TypeError(f"warmup_from_zero must be a bool, got {type(warmup_from_zero).__name__}")
    if warmup_from_zero and warmup_type != "linear":
        raise ValueError(
            "warmup_from_zero=True is transformers 4.x's linear warmup: warmup_type must be 'linear'"
        )
    if num_stable_steps is not None:
        stable = num_stable_steps
    elif num_training_steps is not None:
        stable = num_training_steps - num_warmup_steps - num_decay_steps
    else:  # pragma: no cover - refused above
        raise ValueError("Either num_training_steps or num_stable_steps must be specified.")
    lr_lambda = partial(
        wsd,
        num_warmup_steps=num_warmup_steps,
        num_stable_steps=stable,
        num_decay_steps=num_decay_steps,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=min_lr_ratio,
        num_cycles=num_cycles,
        warmup_from_zero=warmup_from_zero,
    )
    return attach_config(
        LambdaLR(optimizer, lr_lambda, last_epoch),
        "warmup_stable_decay",
        {
            "num_warmup_steps": num_warmup_steps,
            "num_decay_steps": num_decay_steps,
            "num_training_steps": num_training_steps,
            "num_stable_steps": num_stable_steps,
            "warmup_type": warmup_type,
            "decay_type": decay_type,
            "min_lr_ratio": min_lr_ratio,
            "num_cycles": num_cycles,
            "warmup_from_zero": warmup_from_zero,
        },
    )
