"""``BertAdam`` and its learning-rate schedules, as pytorch-pretrained-bert 0.6.2 (``optimization.py``) had them.

Per parameter, at step ``t`` (counted from 0, the schedule is read BEFORE the count is incremented)::

    g = g * min(max_grad_norm / (||g|| + 1e-6), 1)   # each gradient clipped on its own, in place
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g*g                            # no bias correction
    p -= lr*schedule(t) * (m / (sqrt(v) + e) + weight_decay*p)

The schedule is an object (``WarmupLinearSchedule`` ...) kept in each param group under ``"schedule"``; its
multiplier depends on ``progress = t / t_total`` and it warns (once per new progress value) when training runs
past ``t_total``. ``_single_tensor_bert_adam`` runs the legacy code's torch ops in the same order (bit-for-bit
equal on CPU); ``_multi_tensor_bert_adam`` is the same with ``torch._foreach_*``; ``_fused_bert_adam`` maps each
step onto ``torch._fused_adamw_``.
"""

from __future__ import annotations

import abc
import difflib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from hf_optim.optimizers._kernels import (
    check_flags,
    check_number,
    fused_adamw,
    group_buckets,
    steps_to_tensors,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OWN_CALL_MIN_NUMEL",
    "SCHEDULES",
    "SCHEDULE_CLASSES",
    "BertAdam",
    "ConstantLR",
    "LRSchedule",
    "WarmupConstantSchedule",
    "WarmupCosineSchedule",
    "WarmupCosineWithHardRestartsSchedule",
    "WarmupCosineWithWarmupRestartsSchedule",
    "WarmupLinearSchedule",
    "bert_adam",
    "check_legacy_adam_args",
    "clip_coefficients",
    "clip_grad_norms_",
    "clipped_indices",
    "gather_legacy_state",
    "resolve_schedule",
    "scheduled_lrs",
    "step_values",
]


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


class LRSchedule(abc.ABC):
    """Parent of the pytorch-pretrained-bert schedules (``_LRSchedule`` there): a multiplier of the base lr.

    Args:
        warmup: fraction of ``t_total`` used for linear warmup, in [0, 1), or -1 (no warmup).
        t_total: planned number of optimizer steps; negative means the schedule is not applied (multiplier 1).
    """

    warn_t_total = False  # True where progressing beyond t_total makes no sense

    def __init__(self, warmup: float = 0.002, t_total: float = -1) -> None:
        if t_total < 0:
            logger.warning(f"t_total value of {t_total} results in schedule not being applied")
        if not 0.0 <= warmup < 1.0 and not warmup == -1:
            raise ValueError(f"Invalid warmup: {warmup} - should be in [0.0, 1.0[ or -1")
        warmup = max(warmup, 0.0)
        self.warmup, self.t_total = float(warmup), float(t_total)
        self.warned_for_t_total_at_progress: float = -1

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
        if type(self).__name__ not in SCHEDULE_CLASSES or SCHEDULE_CLASSES[type(self).__name__] is not type(
            self
        ):
            raise TypeError(f"{type(self).__name__} is not a built-in schedule: it has no JSON form")
        return {
            "type": type(self).__name__,
            **{name: float(getattr(self, name)) for name in self._JSON_FIELDS},
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> LRSchedule:
        """Rebuild a schedule written by :meth:`to_json_dict` (untrusted input: only built-in classes, numbers).

        ``LRSchedule.from_json_dict`` accepts every built-in schedule; on a subclass, only that exact class.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a schedule must be a JSON object, got {type(data).__name__}")
        kind = data.get("type")
        schedule_cls = SCHEDULE_CLASSES.get(kind) if isinstance(kind, str) else None
        if schedule_cls is None or not (cls is LRSchedule or schedule_cls is cls):
            raise ValueError(f"unknown schedule type {kind!r}; known: {', '.join(sorted(SCHEDULE_CLASSES))}")
        expected = {"type", *schedule_cls._JSON_FIELDS}
        if set(data) != expected:
            raise ValueError(f"schedule {kind} needs exactly the keys {sorted(expected)}, got {sorted(data)}")
        values = {}
        for name in schedule_cls._JSON_FIELDS:
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"schedule {kind}: {name} must be a finite number, got {value!r}")
            values[name] = float(value)
        if not (0.0 <= values["warmup"] < 1.0):
            raise ValueError(f"schedule {kind}: warmup must be in [0, 1), got {values['warmup']!r}")
        schedule = schedule_cls.__new__(schedule_cls)  # no __init__: it would warn again and re-derive warmup
        schedule.__dict__.update(values)
        return schedule

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]

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
        super().__init__(warmup=warmup, t_total=t_total)
        self.cycles = cycles

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)  # progress after warmup
        return 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2 * progress))


class WarmupCosineWithHardRestartsSchedule(WarmupCosineSchedule):
    """Linear warmup, then ``cycles`` (>= 1) cosine decays from 1 to 0, each restarting at 1."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0) -> None:
        if not cycles >= 1.0:
            raise ValueError(f"Invalid cycles: {cycles} - should be >= 1.0")
        super().__init__(warmup=warmup, t_total=t_total, cycles=cycles)

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        progress = (progress - self.warmup) / (1 - self.warmup)  # progress after warmup
        return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1)))


class WarmupCosineWithWarmupRestartsSchedule(WarmupCosineWithHardRestartsSchedule):
    """Training split in ``cycles`` equal parts, each a linear warmup over ``warmup`` of it, then a cosine decay."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1, cycles: float = 1.0) -> None:
        if not warmup * cycles < 1.0:
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
    if schedule not in SCHEDULES:
        names = [k for k in SCHEDULES if k is not None]
        close = difflib.get_close_matches(str(schedule), names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Invalid schedule parameter: {schedule!r}.{hint} Valid: None, {', '.join(map(repr, names))} "
            "or an LRSchedule object"
        )
    return SCHEDULES[schedule](warmup=warmup, t_total=t_total)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def check_legacy_adam_args(lr: float, b1: float, b2: float, e: float) -> None:
    """``ValueError`` naming the argument for a negative ``lr`` / ``e`` or betas outside [0, 1).

    ``weight_decay`` and ``max_grad_norm`` are not checked: the legacy optimizers read a value <= 0 as "off".
    """
    check_number("lr", lr)
    check_number("b1", b1, high=1.0)
    check_number("b2", b2, high=1.0)
    check_number("e", e)


def scheduled_lrs(lr: float, schedule: Callable[[float], float], steps: list[float]) -> dict[float, float]:
    """``lr * schedule(t)`` for each distinct ``t`` of ``steps``, asked in order (the legacy warnings stay the
    same: a value warns only when it is above every earlier one)."""
    out: dict[float, float] = {}
    for t in steps:
        if t not in out:
            lr_scheduled = lr
            lr_scheduled *= schedule(t)
            out[t] = lr_scheduled
    return out


def step_values(state_steps: list[Tensor]) -> list[float]:
    """The step counters as Python floats (one device sync for all of them)."""
    if not state_steps:
        return []
    if len(state_steps) == 1:
        return [state_steps[0].item()]
    return torch.stack([s.to(state_steps[0].device) for s in state_steps]).tolist()


class LegacyAdam(Optimizer):
    """What BertAdam and OpenAIAdam share: the group checks, a legacy ``state_dict``'s missing keys, ``get_lr``.

    Their groups hold ``lr``, ``schedule`` (an :class:`LRSchedule`), ``b1``, ``b2``, ``e``, ``foreach`` and
    ``fused``; the subclass constructors set the defaults and ``step`` holds the algorithm.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_legacy_adam_args(group["lr"], group["b1"], group["b2"], group["e"])
        if not isinstance(group["schedule"], LRSchedule):
            group["schedule"] = resolve_schedule(group["schedule"], -1, -1)
        check_flags(group["foreach"], group["fused"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a legacy state_dict has no foreach / fused
            group.setdefault("foreach", self.defaults["foreach"])
            group.setdefault("fused", self.defaults["fused"])
        steps_to_tensors(self.state)

    def get_lr(self) -> list[float]:
        """The scheduled lr of every parameter at its current step (``[0]`` before the first step)."""
        lr = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    return [0]
                lr_scheduled = group["lr"]
                lr_scheduled *= group["schedule"].get_lr(float(state["step"]))
                lr.append(lr_scheduled)
        return lr


class BertAdam(LegacyAdam):
    """pytorch-pretrained-bert's ``BertAdam``: Adam without bias correction, weight decay added to the update,
    per-parameter gradient clipping, and a built-in learning-rate schedule.

    Args:
        params: tensors, named parameters or param-group dicts.
        lr: base learning rate, >= 0.
        warmup: warmup fraction of ``t_total`` for a schedule given by name; -1: none.
        t_total: total number of steps for a schedule given by name; -1: constant multiplier 1.
        schedule: ``"warmup_linear"``, ``"warmup_constant"``, ``"warmup_cosine"``, ``"none"``, ``None`` or an
            :class:`LRSchedule` object.
        b1, b2: Adam's betas, in [0, 1).
        e: added to ``sqrt(v)``, >= 0.
        weight_decay: added (times the parameter) to the update before the lr scaling, >= 0.
        max_grad_norm: each gradient is clipped, in place, to this norm on its own; <= 0 switches clipping off.
        foreach: ``False`` (with ``fused`` not True) runs the per-tensor reference path.
        fused: ``None`` (default) picks ``torch._fused_adamw_`` where the tensors can use it.

    State per parameter: ``step`` (float32 tensor), ``next_m``, ``next_v``, as the legacy optimizer named them.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        warmup: float = -1,
        t_total: int = -1,
        schedule: str | LRSchedule | None = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_legacy_adam_args(lr, b1, b2, e)
        check_flags(foreach, fused)
        defaults = {
            "lr": lr,
            "schedule": resolve_schedule(schedule, warmup, t_total),
            "b1": b1,
            "b2": b2,
            "e": e,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = gather_legacy_state(self.state, group, "BertAdam", ("next_m", "next_v"))
            if not params:
                continue
            bert_adam(
                params, grads, [s["next_m"] for s in states], [s["next_v"] for s in states],
                [s["step"] for s in states],
                lr=float(group["lr"]), schedule=group["schedule"].get_lr, beta1=group["b1"], beta2=group["b2"],
                eps=group["e"], weight_decay=group["weight_decay"], max_grad_norm=group["max_grad_norm"],
                foreach=group["foreach"], fused=group["fused"],
            )  # fmt: skip
        return loss


def gather_legacy_state(
    state: dict[Tensor, dict[str, Any]], group: dict[str, Any], optimizer: str, moments: tuple[str, str]
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Parameters of ``group`` with a gradient, the gradients and the states (``step`` + the two ``moments``
    created when missing). A sparse gradient raises ``RuntimeError`` naming the parameter."""
    params, grads = [], []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            names = group.get("param_names")
            raise RuntimeError(
                f"{optimizer} does not support sparse gradients (parameter {names[i] if names else f'#{i}'}); "
                "use torch.optim.SparseAdam or dense gradients"
            )
        params.append(p)
        grads.append(p.grad)
    states = [state[p] for p in params]
    for p, s in zip(params, states, strict=True):
        if not s:
            s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            s[moments[0]] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s[moments[1]] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return params, grads, states


# ----------------------------------------------------------------------------------------------------------------
# Gradient clipping (``clip_grad_norm_(p, max_norm)`` called on each parameter on its own)
# ----------------------------------------------------------------------------------------------------------------


def clip_coefficients(grads: list[Tensor], max_norm: float) -> Tensor:
    """``min(max_norm / (||g|| + 1e-6), 1)`` for each gradient (one ``torch._foreach_norm`` for all)."""
    return torch.clamp(max_norm / (torch.stack(torch._foreach_norm(grads)) + 1e-6), max=1.0)


def clip_grad_norms_(grads: list[Tensor], max_norm: float, *, foreach: bool) -> None:
    """Scale each gradient in place by ``min(max_norm / (||g|| + 1e-6), 1)``, its own norm only.

    ``foreach=False`` calls torch's ``get_total_norm`` on each gradient as ``clip_grad_norm_(p, max_norm)`` did;
    ``True`` takes all norms with one ``torch._foreach_norm`` (the same numbers).
    """
    if not grads:
        return
    if not foreach:
        for grad in grads:
            total_norm = torch.nn.utils.get_total_norm([grad])
            grad.mul_(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
        return
    coefs = clip_coefficients(grads, max_norm)
    if coefs.device.type == "cpu":
        todo = clipped_indices(coefs)
        if todo:
            torch._foreach_mul_([grads[i] for i in todo], list(coefs[todo].unbind()))
        return
    torch._foreach_mul_(grads, list(coefs.unbind()))


def clipped_indices(coefs: Tensor) -> list[int]:
    """Indices whose coefficient is not exactly 1 (a multiplication by 1.0 changes nothing; NaN is kept, as the
    legacy code applied it). Reads the coefficients: only for the CPU, where that does not wait for a device."""
    return (coefs != 1.0).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------------------------------------
# Functional form and its implementations
# ----------------------------------------------------------------------------------------------------------------


def bert_adam(
    params: list[Tensor],
    grads: list[Tensor],
    next_ms: list[Tensor],
    next_vs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    schedule: Callable[[float], float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional BertAdam: clip ``grads`` and update ``params`` and the state lists in place, add 1 to
    ``state_steps``. ``schedule(t)`` is the lr multiplier at step ``t`` (read before the increment).

    ``foreach=False, fused=False`` is the reference; ``None`` picks, per device and dtype, the fastest
    implementation the tensors support.
    """
    check_flags(foreach, fused)
    lrs = scheduled_lrs(lr, schedule, step_values(state_steps))
    tensors = [params, grads, next_ms, next_vs, state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):  # type: ignore[arg-type]
        _IMPLEMENTATIONS[impl](
            *bucket, lrs=lrs, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
        )  # fmt: skip


def _single_tensor_bert_adam(
    params: list[Tensor],
    grads: list[Tensor],
    next_ms: list[Tensor],
    next_vs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
) -> None:
    # The reference: pytorch-pretrained-bert 0.6.2 BertAdam.step, op for op.
    for param, grad, next_m, next_v, step_t in zip(params, grads, next_ms, next_vs, state_steps, strict=True):
        if max_grad_norm > 0:
            clip_grad_norms_([grad], max_grad_norm, foreach=False)
        next_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        next_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = next_m / (next_v.sqrt() + eps)
        if weight_decay > 0.0:
            update += weight_decay * param
        lr_scheduled = lrs[step_t.item()]
        update_with_lr = lr_scheduled * update
        param.add_(-update_with_lr)
        step_t += 1


def _multi_tensor_bert_adam(
    params: list[Tensor],
    grads: list[Tensor],
    next_ms: list[Tensor],
    next_vs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
) -> None:
    # The reference's ops, one foreach call per op, for tensors of one device and dtype.
    if max_grad_norm > 0:
        clip_grad_norms_(grads, max_grad_norm, foreach=True)
    torch._foreach_mul_(next_ms, beta1)
    torch._foreach_add_(next_ms, grads, alpha=1 - beta1)
    torch._foreach_mul_(next_vs, beta2)
    torch._foreach_addcmul_(next_vs, grads, grads, value=1 - beta2)
    update = torch._foreach_sqrt(next_vs)
    torch._foreach_add_(update, eps)
    update = torch._foreach_div(next_ms, update)
    if weight_decay > 0.0:
        torch._foreach_add_(update, torch._foreach_mul(params, weight_decay))
    torch._foreach_mul_(update, [lrs[t] for t in step_values(state_steps)])
    torch._foreach_sub_(params, update)
    torch._foreach_add_(state_steps, 1)


def _fused_bert_adam(
    params: list[Tensor],
    grads: list[Tensor],
    next_ms: list[Tensor],
    next_vs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_grad_norm: float,
) -> None:
    # torch._fused_adamw_ at kernel step k, with bc1 = 1-b1^k and bc2 = 1-b2^k, computes:
    #   p *= 1 - lr'*wd';  p -= lr'/bc1 * m / (sqrt(v)/sqrt(bc2) + eps')
    # BertAdam, with s = lr*schedule(t), is: p = (1 - s*wd) * p - s * m / (sqrt(v) + e)
    # (the decay term uses the old p, as the kernel does). With k = t+1 (any k >= 1 works):
    #   eps' = e/sqrt(bc2) makes the fraction sqrt(bc2) * m / (sqrt(v) + e), so lr' = s*bc1/sqrt(bc2)
    #   cancels both corrections, and wd' = s*wd / lr' gives the factor 1 - s*wd.
    # Clipping: a large gradient that needs it is not multiplied in a pass of its own but gets its own kernel call
    # with grad_scale = 1/coefficient (the kernel divides the gradient by it and stores the result in place).
    own_call: list[int] = []
    coefs = None
    if max_grad_norm > 0:
        coefs = clip_coefficients(grads, max_grad_norm)
        if coefs.device.type == "cpu":
            todo = clipped_indices(coefs)
            own_call = [i for i in todo if grads[i].numel() >= OWN_CALL_MIN_NUMEL]
            rest = [i for i in todo if grads[i].numel() < OWN_CALL_MIN_NUMEL]
            if rest:
                torch._foreach_mul_([grads[i] for i in rest], list(coefs[rest].unbind()))
        else:
            torch._foreach_mul_(grads, list(coefs.unbind()))

    def hyperparameters(k: float) -> tuple[float, float, float]:
        s = lrs[k - 1]
        sqrt_bc2 = math.sqrt(1.0 - beta2**k)
        kernel_lr = s * (1.0 - beta1**k) / sqrt_bc2
        kernel_wd = s * weight_decay / kernel_lr if kernel_lr != 0.0 else 0.0
        return kernel_lr, eps / sqrt_bc2, kernel_wd

    torch._foreach_add_(state_steps, 1)
    tensors = [params, grads, next_ms, next_vs, state_steps]
    batch = tensors
    if own_call:
        separate = set(own_call)
        kept = [i for i in range(len(params)) if i not in separate]
        batch = [[x[i] for i in kept] for x in tensors]
    if batch[0]:
        p, g, m, v, steps = batch
        fused_adamw(p, g, m, v, [], steps, beta1=beta1, beta2=beta2, hyperparameters=hyperparameters)
    for i in own_call:
        lr_k, eps_k, wd_k = hyperparameters(state_steps[i].item())
        torch._fused_adamw_(
            [params[i]], [grads[i]], [next_ms[i]], [next_vs[i]], [], [state_steps[i]],
            lr=lr_k, beta1=beta1, beta2=beta2, weight_decay=wd_k, eps=eps_k, amsgrad=False, maximize=False,
            grad_scale=torch.reciprocal(coefs[i]),  # type: ignore[index]
        )  # fmt: skip


OWN_CALL_MIN_NUMEL = 1 << 16
"""On the default path, a gradient of at least this many elements that needs clipping is clipped inside its own
fused-kernel call (saving a read and a write of it); smaller ones are multiplied together first (one call
costs more than that pass)."""


_IMPLEMENTATIONS = {
    "single_tensor": _single_tensor_bert_adam,
    "multi_tensor": _multi_tensor_bert_adam,
    "fused": _fused_bert_adam,
}
