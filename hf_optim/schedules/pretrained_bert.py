"""The learning-rate schedules of pytorch-pretrained-bert 0.6.2 (``optimization.py``: the ``_LRSchedule`` family).

A schedule is an object kept in each ``BertAdam`` / ``OpenAIAdam`` param group under ``"schedule"``; its multiplier
of the base lr depends on ``progress = step / t_total``, and it warns (once per new progress value) when training
runs past ``t_total``. Checkpoints store it as JSON (class name and attributes); :meth:`LRSchedule.from_json_dict`
rebuilds it through the same checks as the constructor (:meth:`LRSchedule.check_fields`), so a file cannot hold a
schedule the constructor would refuse. This module declares those JSON types (:mod:`hf_optim.json_types`).
"""

from __future__ import annotations

import abc
import difflib
import logging
import math
from collections.abc import Mapping
from typing import Any

from hf_optim.json_types import declare_json_type

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEDULES",
    "SCHEDULE_CLASSES",
    "ConstantLR",
    "LRSchedule",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupCosineWithWarmupRestartsSchedule",
    "WarmupLinearSchedule",
    "resolve_schedule",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


class LRSchedule(abc.ABC):
    """Parent of the pytorch-pretrained-bert schedules (``_LRSchedule`` there): a multiplier of the base lr.

    Args:
        warmup: fraction of ``t_total`` used for linear warmup, in [0, 1), or -1 (no warmup).
        t_total: planned number of optimizer steps, not 0; negative means the schedule is not applied
            (multiplier 1).
    """

    warn_t_total = False  # True where progressing beyond t_total makes no sense

    def __init__(self, warmup: float = 0.002, t_total: float = -1) -> None:
        if _real("t_total", t_total) < 0:
            logger.warning(f"t_total value of {t_total} results in schedule not being applied")
        warmup, t_total = _real("warmup", warmup), float(t_total)
        if not 0.0 <= warmup < 1.0 and not warmup == -1:
            raise ValueError(f"Invalid warmup: {warmup} - should be in [0.0, 1.0[ or -1")
        warmup = max(warmup, 0.0)
        self.warmup, self.t_total = warmup, t_total
        self.warned_for_t_total_at_progress: float = -1
        self.check_fields(vars(self))

    @classmethod
    def check_fields(cls, fields: Mapping[str, float]) -> None:
        """The bounds every instance's attributes meet; the constructor and :meth:`from_json_dict` both check them.

        ``warmup`` in [0, 1) (the constructor maps -1 to 0); ``t_total`` not 0 (the step is divided by it);
        every value a finite number.
        """
        for name in cls._JSON_FIELDS:
            _real(name, fields[name])
        if not 0.0 <= fields["warmup"] < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {fields['warmup']!r}")
        if fields["t_total"] == 0:
            raise ValueError(
                "t_total must not be 0 (progress is step / t_total); a negative value means no schedule"
            )

    def get_lr(self, step: float, nowarn: bool = False) -> float:
        """The multiplier at ``step``; warns once per new progress value past ``t_total`` unless ``nowarn``."""
        if self.t_total < 0:
            return 1.0
        progress = float(step) / self.t_total
        ret = self.get_lr_(progress)
        if (
            not nowarn
            and self.warn_t_total
            and progress > 1.0
            and progress > self.warned_for_t_total_at_progress
        ):
            logger.warning(
                f"Training beyond specified 't_total'. Learning rate multiplier set to {ret}. "
                f"Please set 't_total' of {self.__class__.__name__} correctly."
            )
            self.warned_for_t_total_at_progress = progress
        return ret

    @abc.abstractmethod
    def get_lr_(self, progress: float) -> float:
        """The multiplier at ``progress`` (``step / t_total``; above 1 past ``t_total``)."""

    # JSON form: class name, every attribute, and the warning position (no pickle in checkpoints).

    _JSON_FIELDS: tuple[str, ...] = ("warmup", "t_total", "warned_for_t_total_at_progress")

    def to_json_dict(self) -> dict[str, Any]:
        """``{"type": class name, attribute: value, ...}``: enough to rebuild the schedule exactly."""
        if SCHEDULE_CLASSES.get(type(self).__name__) is not type(self):
            raise TypeError(f"{type(self).__name__} is not a built-in schedule: it has no JSON form")
        return {
            "type": type(self).__name__,
            **{name: float(getattr(self, name)) for name in self._JSON_FIELDS},
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> LRSchedule:
        """Rebuild a schedule written by :meth:`to_json_dict` (untrusted input: only built-in classes, numbers,
        and only values :meth:`check_fields` accepts, as from the constructor).

        ``LRSchedule.from_json_dict`` accepts every built-in schedule; on a subclass, only that exact class.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a schedule must be a JSON object, got {type(data).__name__}")
        kind = data.get("type")
        schedule_cls = SCHEDULE_CLASSES.get(kind) if isinstance(kind, str) else None
        if schedule_cls is None or not (cls is LRSchedule or schedule_cls is cls):
            raise ValueError(f"unknown schedule type {kind!r}; known: {', '.join(sorted(SCHEDULE_CLASSES))}")
        expected = {"type", *schedule_cls._JSON_FIELDS}
        if set(data) != expected:
            raise ValueError(f"schedule {kind} needs exactly the keys {sorted(expected)}, got {sorted(data)}")
        values = {name: _real(f"schedule {kind}: {name}", data[name]) for name in schedule_cls._JSON_FIELDS}
        schedule_cls.check_fields(values)
        schedule = schedule_cls.__new__(schedule_cls)  # no __init__: it would warn again and re-derive warmup
        schedule.__dict__.update(values)
        return schedule

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]  # mutable value object, as the legacy class (eq without hash)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ConstantLR(LRSchedule):
    """Multiplier 1 at every step."""

    def get_lr_(self, progress: float) -> float:
        return 1.0


class WarmupCosineSchedule(LRSchedule):
    """Linear warmup from 0 to 1 over ``warmup``, then ``cycles`` (0.5: a half) cosine periods down to 0."""

    warn_t_total = True
    _JSON_FIELDS = (*LRSchedule._JSON_FIELDS, "cycles")

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 0.5) -> None:
        self.cycles = _real("cycles", cycles)
        super().__init__(warmup=warmup, t_total=t_total)

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)  # progress after warmup
        return 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2 * progress))


class WarmupCosineWithHardRestartsSchedule(WarmupCosineSchedule):
    """Linear warmup, then ``cycles`` (>= 1) cosine decays from 1 to 0, each restarting at 1."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0) -> None:
        if not _real("cycles", cycles) >= 1.0:
            raise ValueError(f"Invalid cycles: {cycles} - should be >= 1.0")
        super().__init__(warmup=warmup, t_total=t_total, cycles=cycles)

    @classmethod
    def check_fields(cls, fields: Mapping[str, float]) -> None:
        """Also ``cycles`` >= 1."""
        super().check_fields(fields)
        if not fields["cycles"] >= 1.0:
            raise ValueError(f"cycles must be >= 1, got {fields['cycles']!r}")

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)  # progress after warmup
        return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1)))


class WarmupCosineWithWarmupRestartsSchedule(WarmupCosineWithHardRestartsSchedule):
    """Training split in ``cycles`` equal parts, each a linear warmup over ``warmup`` of it, then a cosine decay.

    The stored ``warmup`` is the fraction of one cycle (the argument times ``cycles``), so the constructor's bound
    ``warmup * cycles < 1`` is the stored ``warmup < 1`` that :meth:`check_fields` applies.
    """

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0) -> None:
        if not _real("warmup", warmup) * _real("cycles", cycles) < 1.0:
            raise ValueError(f"Invalid warmup * cycles: {warmup} * {cycles} - should be < 1.0")
        warmup = warmup * cycles if warmup >= 0 else warmup
        super().__init__(warmup=warmup, t_total=t_total, cycles=cycles)

    def get_lr_(self, progress: float) -> float:
        progress = progress * self.cycles % 1.0
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)  # progress after warmup
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupConstantSchedule(LRSchedule):
    """Linear warmup from 0 to 1 over ``warmup``, then 1."""

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return 1.0


class WarmupLinearSchedule(LRSchedule):
    """Linear warmup from 0 to 1 over ``warmup``, then linear decay to 0 at ``t_total`` (0 after)."""

    warn_t_total = True

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return max((progress - 1.0) / (self.warmup - 1.0), 0.0)


SCHEDULES: dict[str | None, type[LRSchedule]] = {
    None: ConstantLR,
    "none": ConstantLR,
    "warmup_cosine": WarmupCosineSchedule,
    "warmup_constant": WarmupConstantSchedule,
    "warmup_linear": WarmupLinearSchedule,
}

SCHEDULE_CLASSES: dict[str, type[LRSchedule]] = {
    cls.__name__: cls
    for cls in (
        ConstantLR,
        WarmupCosineSchedule,
        WarmupCosineWithHardRestartsSchedule,
        WarmupCosineWithWarmupRestartsSchedule,
        WarmupConstantSchedule,
        WarmupLinearSchedule,
    )
}
"""The built-in schedule classes by name: the only ones a checkpoint may name."""


def resolve_schedule(schedule: str | LRSchedule | None, warmup: float, t_total: float) -> LRSchedule:
    """The schedule object for an optimizer's ``schedule`` argument (a ``SCHEDULES`` key or an object).

    An unknown name raises ``ValueError`` with the closest names; ``warmup`` / ``t_total`` next to an object are
    ignored with the legacy warning.
    """
    if isinstance(schedule, LRSchedule):
        if warmup != -1 or t_total != -1:
            logger.warning(
                "warmup and t_total on the optimizer are ineffective when _LRSchedule object is provided as "
                "schedule. Please specify custom warmup and t_total in _LRSchedule object."
            )
        return schedule
    if schedule is not None and not isinstance(schedule, str):
        raise TypeError(
            f"schedule must be a name, None or an LRSchedule object, got {type(schedule).__name__}"
        )
    if schedule not in SCHEDULES:
        names = [k for k in SCHEDULES if k is not None]
        close = difflib.get_close_matches(str(schedule), names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Invalid schedule parameter: {schedule!r}.{hint} Valid: None, {', '.join(map(repr, names))} "
            "or an LRSchedule object"
        )
    return SCHEDULES[schedule](warmup=warmup, t_total=t_total)


def _declare_json_types() -> None:
    # Each class rebuilds only itself, from numbers check_fields accepts.
    for name, cls in SCHEDULE_CLASSES.items():
        declare_json_type(
            cls,
            name=f"pytorch_pretrained_bert.{name}",
            to_json=cls.to_json_dict,
            from_json=cls.from_json_dict,
        )


_declare_json_types()
