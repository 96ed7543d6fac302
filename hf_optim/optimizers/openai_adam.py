"""``OpenAIAdam`` as pytorch-pretrained-bert 0.6.2 (``optimization_openai.py``) had it.

Per parameter, at step ``t`` (counted from 1: the count is incremented first, then the schedule is read)::

    g = g * min(max_grad_norm / (||g|| + 1e-6), 1)   # only if max_grad_norm > 0; each gradient on its own
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g*g
    s = lr * schedule(t)
    p -= s * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + e)
    p -= s * weight_decay * p                        # after the update; only tensors with > 1 dim unless vector_l2

It shares BertAdam's schedules (:mod:`hf_optim.schedules.pretrained_bert`). ``_single_tensor_openai_adam`` runs the legacy
ops in order (bit-for-bit equal on CPU); ``_multi_tensor_openai_adam`` uses ``torch._foreach_*``;
``_fused_openai_adam`` maps each step onto ``torch._fused_adamw_`` as hf_optim's ``AdamW`` does.
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
    clip_grad_norms_,
    fused_adamw,
    gather_legacy_state,
    group_buckets,
    scheduled_lrs,
    step_values,
)
from hf_optim.schedules.pretrained_bert import LRSchedule, resolve_schedule

__all__ = ["OpenAIAdam", "openai_adam"]


class OpenAIAdam(LegacyAdam):
    """pytorch-pretrained-bert's ``OpenAIAdam``: bias-corrected Adam with a built-in schedule and decoupled
    weight decay after the update (scaled by the scheduled lr) on matrices only, unless ``vector_l2``.

    Args:
        params: tensors, named parameters or param-group dicts.
        lr: base learning rate, >= 0.
        schedule: ``"warmup_linear"``, ``"warmup_constant"``, ``"warmup_cosine"``, ``"none"``, ``None`` or an
            :class:`~hf_optim.schedules.pretrained_bert.LRSchedule` object.
        warmup: warmup fraction of ``t_total`` for a schedule given by name; -1: none.
        t_total: total number of steps for a schedule given by name; -1: constant multiplier 1.
        b1: Decay of the first moment, in [0, 1).
        b2: Decay of the second moment, in [0, 1).
        e: added to ``sqrt(v)``, >= 0.
        weight_decay: decay after the update; <= 0 switches it off; ``lr * weight_decay`` at most 1.
        vector_l2: decay 1-dim tensors (biases, norms) too.
        max_grad_norm: each gradient clipped in place to this norm on its own; <= 0 (default -1) switches it
            off; NaN is refused.
        foreach: ``False`` (with ``fused`` not True) runs the per-tensor reference path.
        fused: ``None`` (default) picks ``torch._fused_adamw_`` where the tensors can use it.

    State per parameter: ``step`` (float32 tensor), ``exp_avg``, ``exp_avg_sq``.

    Raises:
        TypeError: If a hyperparameter is not a real number (or a flag not a bool).
        ValueError: If a hyperparameter is out of its range, or ``foreach`` and ``fused`` are both ``True``, or
            ``schedule`` names no schedule.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(4, 2)
        optimizer = hf_optim.OpenAIAdam(model.parameters(), lr=6.25e-5, warmup=0.002, t_total=100, weight_decay=0.01)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        ```
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        schedule: str | LRSchedule | None = "warmup_linear",
        warmup: float = -1,
        t_total: int = -1,
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-8,
        weight_decay: float = 0,
        vector_l2: bool = False,
        max_grad_norm: float = -1,
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
            "vector_l2": vector_l2,
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
            params, grads, states = gather_legacy_state(
                self.state, group, "OpenAIAdam", ("exp_avg", "exp_avg_sq")
            )
            if not params:
                continue
            openai_adam(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                lr=float(group["lr"]), schedule=group["schedule"].get_lr, beta1=group["b1"], beta2=group["b2"],
                eps=group["e"], weight_decay=group["weight_decay"], vector_l2=group["vector_l2"],
                max_grad_norm=group["max_grad_norm"], foreach=group["foreach"], fused=group["fused"],
            )  # fmt: skip
        return loss


def openai_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    schedule: Callable[[float], float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    vector_l2: bool,
    max_grad_norm: float,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional OpenAIAdam: add 1 to ``state_steps``, clip ``grads``, update ``params`` and the moments in
    place. ``schedule(t)`` is the lr multiplier at the new step ``t``.

    ``foreach=False, fused=False`` is the reference; ``None`` picks, per device and dtype, the fastest
    implementation the tensors support.

    Args:
        params: The parameters to update.
        grads: Their gradients (clipped in place when ``max_grad_norm > 0``).
        exp_avgs: The first moments, updated in place.
        exp_avg_sqs: The second moments, updated in place.
        state_steps: Step counters (one tensor each), incremented in place.
        lr: Base learning rate.
        schedule: The lr multiplier as a function of the step.
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        eps: Added to ``sqrt(v)``.
        weight_decay: Decoupled decay after the update, scaled by the scheduled lr.
        vector_l2: Decay 1-dim tensors too.
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
        hf_optim.openai_adam(
            [p], [g], [m], [v], [step], lr=0.1, schedule=lambda t: 1.0, beta1=0.9, beta2=0.999, eps=1e-6,
            weight_decay=0.0, vector_l2=False, max_grad_norm=1.0
        )
        assert step.item() == 1 and torch.all(p < 1)
        ```
    """
    check_flags(foreach, fused)
    lrs = scheduled_lrs(lr, schedule, [t + 1 for t in step_values(state_steps)])
    tensors = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):
        if impl == "fused" and weight_decay > 0 and any(s * weight_decay == 1.0 for s in lrs.values()):
            impl = "multi_tensor"  # the decay factor is 0: no re-parametrisation of the fused kernel exists
        _IMPLEMENTATIONS[impl](
            *bucket, lrs=lrs, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            vector_l2=vector_l2, max_grad_norm=max_grad_norm,
        )  # fmt: skip


def _decays(param: Tensor, weight_decay: float, vector_l2: bool) -> bool:
    return (len(param.size()) > 1 or vector_l2) and weight_decay > 0


def _single_tensor_openai_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    vector_l2: bool,
    max_grad_norm: float,
) -> None:
    # The reference: pytorch-pretrained-bert 0.6.2 OpenAIAdam.step, op for op.
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        step = step_t.item()
        if max_grad_norm > 0:
            clip_grad_norms_([grad], max_grad_norm, foreach=False)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        lr_scheduled = lrs[step]
        step_size = lr_scheduled * math.sqrt(bias_correction2) / bias_correction1
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if _decays(param, weight_decay, vector_l2):
            param.add_(param, alpha=-lr_scheduled * weight_decay)


def _multi_tensor_openai_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    vector_l2: bool,
    max_grad_norm: float,
) -> None:
    # The reference's ops, one foreach call per op, for tensors of one device and dtype.
    torch._foreach_add_(state_steps, 1)
    if max_grad_norm > 0:
        clip_grad_norms_(grads, max_grad_norm, foreach=True)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    steps = step_values(state_steps)
    step_sizes = [-(lrs[t] * math.sqrt(1 - beta2**t) / (1 - beta1**t)) for t in steps]
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
    decayed = [i for i, p in enumerate(params) if _decays(p, weight_decay, vector_l2)]
    if decayed:
        decayed_params = [params[i] for i in decayed]
        alphas = [-lrs[steps[i]] * weight_decay for i in decayed]
        if alphas.count(alphas[0]) == len(alphas):
            torch._foreach_add_(decayed_params, decayed_params, alpha=alphas[0])
        else:
            torch._foreach_add_(decayed_params, torch._foreach_mul(decayed_params, alphas))


def _fused_openai_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lrs: dict[float, float],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    vector_l2: bool,
    max_grad_norm: float,
) -> None:
    # torch._fused_adamw_ computes, with bc1 = 1-b1^t and bc2 = 1-b2^t:
    #   p *= 1 - lr'*wd';  p -= lr'/bc1 * m / (sqrt(v)/sqrt(bc2) + eps')
    # OpenAIAdam, with s = lr*schedule(t) and decay d = s*wd (0 for tensors that are not decayed), multiplied out:
    #   p = (1 - d) * p - (1 - d) * s*sqrt(bc2)/bc1 * m / (sqrt(v) + e)
    # so eps' = e/sqrt(bc2), lr' = s * (1 - d) and wd' = d / lr'  (hf_optim's AdamW mapping with lr -> s).
    torch._foreach_add_(state_steps, 1)
    if max_grad_norm > 0:
        clip_grad_norms_(grads, max_grad_norm, foreach=True)

    def hyperparameters_for(decay: bool) -> Callable[[float], tuple[float, float, float]]:
        def hyperparameters(t: float) -> tuple[float, float, float]:
            s = lrs[t]
            d = s * weight_decay if decay else 0.0
            kernel_lr = s * (1.0 - d)
            kernel_wd = d / kernel_lr if kernel_lr != 0.0 else 0.0
            return kernel_lr, eps / math.sqrt(1.0 - beta2**t), kernel_wd

        return hyperparameters

    tensors = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    mask = [_decays(p, weight_decay, vector_l2) for p in params]
    for decay in (True, False):
        idx = [i for i, m in enumerate(mask) if m is decay]
        if not idx:
            continue
        p, g, m, v, steps = [[x[i] for i in idx] for x in tensors]
        fused_adamw(
            p, g, m, v, [], steps, beta1=beta1, beta2=beta2, hyperparameters=hyperparameters_for(decay)
        )


_IMPLEMENTATIONS = {
    "single_tensor": _single_tensor_openai_adam,
    "multi_tensor": _multi_tensor_openai_adam,
    "fused": _fused_openai_adam,
}
