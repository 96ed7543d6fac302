"""``BertAdam`` and its learning-rate schedules, as pytorch-pretrained-bert 0.6.2 (``optimization.py``) had them.

Per parameter, at step ``t`` (counted from 0, the schedule is read BEFORE the count is incremented)::

    g = g * min(max_grad_norm / (||g|| + 1e-6), 1)   # each gradient clipped on its own, in place
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g*g                            # no bias correction
    p -= lr*schedule(t) * (m / (sqrt(v) + e) + weight_decay*p)

The schedule is an object (``WarmupLinearSchedule`` ...) kept in each param group under ``"schedule"``
(:mod:`hf_optim.schedules.pretrained_bert`, re-exported here). ``_single_tensor_bert_adam`` runs the legacy code's torch ops in the same order (bit-for-bit
equal on CPU); ``_multi_tensor_bert_adam`` is the same with ``torch._foreach_*``; ``_fused_bert_adam`` maps each
step onto ``torch._fused_adamw_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from hf_optim.optimizers._kernels import (
    LegacyAdam,
    check_flags,
    check_legacy_adam_group,
    clip_coefficients,
    clip_grad_norms_,
    clipped_indices,
    fused_adamw,
    gather_legacy_state,
    group_buckets,
    scheduled_lrs,
    step_values,
)
from hf_optim.schedules.pretrained_bert import (
    SCHEDULE_CLASSES,
    SCHEDULES,
    ConstantLR,
    LRSchedule,
    WarmupConstantSchedule,
    WarmupCosineSchedule,
    WarmupCosineWithHardRestartsSchedule,
    WarmupCosineWithWarmupRestartsSchedule,
    WarmupLinearSchedule,
    resolve_schedule,
)

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
    "resolve_schedule",
]


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
        b1: Decay of the first moment, in [0, 1).
        b2: Decay of the second moment, in [0, 1).
        e: added to ``sqrt(v)``, >= 0.
        weight_decay: added (times the parameter) to the update before the lr scaling; <= 0 switches it off;
            ``lr * weight_decay`` at most 1.
        max_grad_norm: each gradient is clipped, in place, to this norm on its own; <= 0 switches clipping off;
            NaN is refused.
        foreach: ``False`` (with ``fused`` not True) runs the per-tensor reference path.
        fused: ``None`` (default) picks ``torch._fused_adamw_`` where the tensors can use it.

    State per parameter: ``step`` (float32 tensor), ``next_m``, ``next_v``, as the legacy optimizer named them.

    Raises:
        TypeError: If a hyperparameter is not a real number (or a flag not a bool).
        ValueError: If a hyperparameter is out of its range, or ``foreach`` and ``fused`` are both ``True``, or
            ``schedule`` names no schedule.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(4, 2)
        optimizer = hf_optim.BertAdam(model.parameters(), lr=5e-5, warmup=0.1, t_total=100)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        assert set(optimizer.state[model.weight]) == {"step", "next_m", "next_v"}
        ```
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
        check_legacy_adam_group(defaults)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch overloads step() on closure
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

    Args:
        params: The parameters to update.
        grads: Their gradients (clipped in place when ``max_grad_norm > 0``).
        next_ms: The first moments, updated in place.
        next_vs: The second moments, updated in place.
        state_steps: Step counters (one tensor each), incremented in place.
        lr: Base learning rate.
        schedule: The lr multiplier as a function of the step.
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        eps: Added to ``sqrt(v)``.
        weight_decay: Added (times the parameter) to the update before the lr scaling.
        max_grad_norm: Per-tensor gradient clipping norm; <= 0 switches it off.
        foreach: ``False`` (with ``fused`` not ``True``) runs the per-tensor reference.
        fused: ``None`` picks ``torch._fused_adamw_`` where the tensors allow.

    Raises:
        ValueError: If ``foreach`` and ``fused`` are both ``True``.
        RuntimeError: If ``fused=True`` and a tensor's device or dtype has no fused kernel.

    Example:
        ```python
        import torch
        import hf_optim

        p, g = torch.ones(3), torch.full((3,), 0.5)
        m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
        hf_optim.bert_adam(
            [p], [g], [m], [v], [step], lr=0.1, schedule=lambda t: 1.0, beta1=0.9, beta2=0.999, eps=1e-6,
            weight_decay=0.0, max_grad_norm=1.0
        )
        assert step.item() == 1 and torch.all(p < 1)
        ```
    """
    check_flags(foreach, fused)
    lrs = scheduled_lrs(lr, schedule, step_values(state_steps))
    tensors = [params, grads, next_ms, next_vs, state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):
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
            grad_scale=torch.reciprocal(coefs[i]),  # type: ignore[index]  # set when own_call is not empty
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
