"""``AdamW`` as transformers 4.x had it (``transformers.AdamW``, ``optim="adamw_hf"``), with fast paths.

Per parameter, at step ``t``::

    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g*g
    step_size = lr * sqrt(1-b2^t) / (1-b1^t)      # just lr when correct_bias=False
    p -= step_size * m / (sqrt(v) + eps)
    p -= lr * weight_decay * p                      # after the update, plain lr

This is not ``torch.optim.AdamW``: there ``eps`` is added after the bias correction of ``sqrt(v)`` and the decay
comes before the update; and there is no ``correct_bias``. ``_single_tensor_adamw`` runs the legacy code's torch
ops in the same order (bit-for-bit equal on CPU); ``_multi_tensor_adamw`` is the same with ``torch._foreach_*``;
``_fused_adamw`` maps each step onto ``torch._fused_adamw_`` (same result up to float rounding, and as fast).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from hf_optim.optimizers._kernels import (
    check_flags,
    check_number,
    fused_adamw,
    gather_state,
    group_buckets,
    steps_to_tensors,
)

__all__ = ["AdamW", "adamw"]


class AdamW(torch.optim.AdamW):
    """transformers 4.x ``AdamW``: Adam with decoupled weight decay applied after the update, and ``correct_bias``.

    Subclasses ``torch.optim.AdamW`` so code that checks ``isinstance(opt, torch.optim.AdamW)`` (DeepSpeed's
    CPU-offload swap, accelerate) treats it as AdamW; hyperparameters live in the param groups under torch's names
    (``lr``, ``betas``, ``eps``, ``weight_decay``) plus ``correct_bias``, so LR schedulers work unchanged.

    Args:
        params: tensors, ``model.named_parameters()``, or param-group dicts (as torch.optim accepts).
        lr: learning rate, >= 0.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v)`` before dividing, >= 0.
        weight_decay: decoupled weight decay, >= 0, applied after the Adam update with the plain ``lr``.
        correct_bias: whether to apply Adam's bias correction (BERT used ``False``).
        foreach: ``False`` together with ``fused=False`` runs the per-tensor reference path.
        fused: ``None`` (default) picks ``torch._fused_adamw_`` when every parameter can use it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_flags(foreach, fused)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "foreach": foreach,
            "fused": fused,
        }
        # torch.optim.AdamW.__init__ would validate and store torch's own options; only the base class is wanted.
        Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_number("lr", group["lr"])
        _check_betas(group["betas"])
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        check_flags(group["foreach"], group["fused"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Not Adam.__setstate__: it would add torch's own group options.
        Optimizer.__setstate__(self, state)
        for group in self.param_groups:  # keys a legacy or torch state_dict lacks: the constructor's choice
            for key in ("correct_bias", "foreach", "fused"):
                group.setdefault(key, self.defaults[key])
        steps_to_tensors(self.state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = gather_state(self.state, group, lambda p: p.grad, "AdamW")
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], correct_bias=group["correct_bias"],
                foreach=group["foreach"], fused=group["fused"],
            )  # fmt: skip
        return loss


def _check_betas(betas: tuple[float, float]) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_number("betas[0]", betas[0], high=1.0)
    check_number("betas[1]", betas[1], high=1.0)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool = True,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional legacy AdamW: update ``params`` and the state lists in place, and add 1 to ``state_steps``.

    ``foreach=False, fused=False`` is the reference; ``None`` picks, per device and dtype, the fastest
    implementation the tensors support.
    """
    check_flags(foreach, fused)
    tensors = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):  # type: ignore[arg-type]
        if impl == "fused" and weight_decay > 0 and lr * weight_decay == 1.0:
            impl = "multi_tensor"  # the decay factor is 0: no re-parametrisation of the fused kernel exists
        _IMPLEMENTATIONS[impl](
            *bucket,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
        )


def _single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    # The reference: transformers 4.x AdamW.step, op for op.
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        step = step_t.item()
        exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        step_size = lr
        if correct_bias:
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if weight_decay > 0.0:
            param.add_(param, alpha=(-lr * weight_decay))


def _multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    # The reference's ops, one foreach call per op, for tensors of one device and dtype.
    torch._foreach_add_(state_steps, 1)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if correct_bias:
        step_sizes = [
            -(lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)) for t in torch.stack(state_steps).tolist()
        ]
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


def _fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    # torch._fused_adamw_ computes, with bias corrections bc1 = 1-b1^t and bc2 = 1-b2^t:
    #   p *= 1 - lr'*wd';  p -= lr'/bc1 * m / (sqrt(v)/sqrt(bc2) + eps')
    # The legacy update, multiplied out, is:
    #   p = (1 - lr*wd) * p - (1 - lr*wd) * s * m / (sqrt(v) + eps),   s = lr*sqrt(bc2)/bc1 (or lr)
    # so eps' = eps/sqrt(bc2), lr' = (lr or lr*bc1/sqrt(bc2)) * (1 - lr*wd) and wd' = lr*wd / lr'.
    shrink = 1.0 - lr * weight_decay

    def hyperparameters(t: float) -> tuple[float, float, float]:
        sqrt_bc2 = math.sqrt(1.0 - beta2**t)
        kernel_lr = lr if correct_bias else lr * (1.0 - beta1**t) / sqrt_bc2
        kernel_lr *= shrink
        kernel_wd = lr * weight_decay / kernel_lr if kernel_lr != 0.0 else 0.0
        return kernel_lr, eps / sqrt_bc2, kernel_wd

    torch._foreach_add_(state_steps, 1)
    fused_adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        beta1=beta1, beta2=beta2, hyperparameters=hyperparameters,
    )  # fmt: skip


_IMPLEMENTATIONS = {
    "single_tensor": _single_tensor_adamw,
    "multi_tensor": _multi_tensor_adamw,
    "fused": _fused_adamw,
}
