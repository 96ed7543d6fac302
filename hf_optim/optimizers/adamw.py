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
    adam_step_sizes,
    check_decay,
    check_flags,
    check_loaded_state,
    check_number,
    fused_adamw,
    gather_state,
    group_buckets,
    set_steps,
    steps_to_tensors,
    tensor_steps,
)

__all__ = ["AdamW", "adamw"]

_STATE_KEYS: tuple[set[str], set[str]] = ({"step", "exp_avg", "exp_avg_sq"}, set())

# torch.optim.AdamW's param-group options and the only value of each that keeps the legacy math.
TORCH_ADAMW_FIXED_OPTIONS: dict[str, bool] = {
    "amsgrad": False,
    "maximize": False,
    "differentiable": False,
    "decoupled_weight_decay": True,
}


class AdamW(torch.optim.AdamW):
    """transformers 4.x ``AdamW``: Adam with decoupled weight decay applied after the update, and ``correct_bias``.

    It is a ``torch.optim.AdamW`` (``isinstance`` holds) and its param groups carry every key of torch's AdamW
    groups, with the values that describe its math: ``amsgrad=False``, ``maximize=False``,
    ``differentiable=False``, ``decoupled_weight_decay=True`` (other values are refused, they would change the
    algorithm), and ``capturable``, ``foreach``, ``fused`` (honoured: they only pick an implementation). Code that
    reads torch's keys or checks the class works, LR schedulers included.

    ``isinstance`` is what accelerate reads when DeepSpeed ZeRO-Offload is configured: ``Accelerator.prepare``
    (Trainer's too) then *replaces* any client optimizer by ``DeepSpeedCPUAdam``, in AdamW mode (decoupled decay)
    for a ``torch.optim.AdamW``, in Adam-with-L2 mode otherwise. Either way the legacy details (``eps`` before the
    bias correction, decay after the update, ``correct_bias=False``) are lost; AdamW mode is the closer one. No
    method of this class runs during or after that swap, so it cannot warn; ``"zero_force_ds_cpu_optimizer":
    false`` in the DeepSpeed config prevents the swap and DeepSpeed then runs this optimizer itself.

    Args:
        params: tensors, ``model.named_parameters()``, or param-group dicts (as torch.optim accepts).
        lr: learning rate, >= 0.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v)`` before dividing, >= 0.
        weight_decay: decoupled weight decay, >= 0, applied after the Adam update with the plain ``lr``;
            ``lr * weight_decay`` at most 1.
        correct_bias: whether to apply Adam's bias correction (BERT used ``False``).
        foreach: ``False`` together with ``fused=False`` runs the per-tensor reference path.
        fused: ``None`` (default) picks ``torch._fused_adamw_`` when every parameter can use it.
        capturable: compute the bias corrections on the step tensors (no host sync; CUDA graphs). Always the case
            under ``torch.compile``.
        amsgrad: torch's option; only ``False`` is accepted (it would change the algorithm).
        maximize: torch's option; only ``False`` is accepted.
        differentiable: torch's option; only ``False`` is accepted.

    Raises:
        TypeError: If a hyperparameter is not a real number (or a flag not a bool).
        ValueError: If a hyperparameter is out of its range, or ``foreach`` and ``fused`` are both ``True``.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(4, 2)
        optimizer = hf_optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, correct_bias=False)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        assert optimizer.state[model.weight]["step"] == 1
        ```
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
        capturable: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
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
            "capturable": capturable,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "differentiable": differentiable,
            "decoupled_weight_decay": True,
        }
        _check_torch_options(defaults)
        # torch.optim.AdamW.__init__ would validate its own option values and store its eps default; the base
        # class is enough, the keys are all in ``defaults``.
        Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Not Adam.__setstate__: its defaults for missing keys are torch's, these are the constructor's.
        Optimizer.__setstate__(self, state)
        for group in self.param_groups:  # keys a legacy or older torch state_dict lacks
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        steps_to_tensors(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class, of transformers 4.x ``AdamW`` or of ``torch.optim.AdamW``.

        Raises ``ValueError`` (loading nothing) when a parameter's state has other keys than ``step``,
        ``exp_avg``, ``exp_avg_sq`` (e.g. BertAdam's ``next_m`` / ``next_v``), a moment of the wrong shape, or a
        group option that would change the math (``amsgrad=True``...). Runs after the caller's own
        ``register_load_state_dict_pre_hook`` hooks, which may convert a foreign state_dict first.
        """
        handle = self.register_load_state_dict_pre_hook(_check_loaded)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch overloads step() on closure
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
                foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
            )  # fmt: skip
        return loss


def _check_torch_options(group: dict[str, Any]) -> None:
    for key in ("capturable", *TORCH_ADAMW_FIXED_OPTIONS):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {type(group[key]).__name__}")
    for key, value in TORCH_ADAMW_FIXED_OPTIONS.items():
        if group[key] is not value:
            raise ValueError(
                f"{key}={group[key]} would change the algorithm: hf_optim.AdamW is transformers 4.x AdamW and "
                f"keeps torch.optim.AdamW's {key}={value}; use torch.optim.AdamW for {key}={group[key]}"
            )


def _check_loaded(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    check_loaded_state(optimizer, state_dict, lambda group: _STATE_KEYS)
    for saved in state_dict["param_groups"]:
        _check_group({**optimizer.defaults, **saved})


def _check_group(group: dict[str, Any]) -> None:
    """A group's bounds, for new groups and loaded ones: finite numbers, betas in [0, 1), lr * weight_decay <= 1."""
    check_number("lr", group["lr"])
    _check_betas(group["betas"])
    check_number("eps", group["eps"])
    check_number("weight_decay", group["weight_decay"])
    check_decay(group["lr"], group["weight_decay"])
    check_flags(group["foreach"], group["fused"])
    _check_torch_options(group)


def _check_betas(betas: tuple[float, float]) -> None:
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {type(betas).__name__}")
    if len(betas) != 2:
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
    capturable: bool = False,
) -> None:
    """Functional legacy AdamW: update ``params`` and the state lists in place, and add 1 to ``state_steps``.

    The loop body of :class:`AdamW`, for code that keeps its own state (as ``torch.optim.adamw.adamw`` is for
    torch's optimizer). ``foreach=False, fused=False`` is the reference; ``None`` picks, per device and dtype, the
    fastest implementation the tensors support.

    Args:
        params: The parameters to update.
        grads: Their gradients.
        exp_avgs: The first moments, updated in place.
        exp_avg_sqs: The second moments, updated in place.
        state_steps: Step counters (one tensor each), incremented in place.
        lr: Learning rate.
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        eps: Added to ``sqrt(v)`` before dividing.
        weight_decay: Decoupled weight decay, applied after the update with the plain ``lr``.
        correct_bias: Whether to apply Adam's bias correction.
        foreach: ``False`` (with ``fused`` not ``True``) runs the per-tensor reference.
        fused: ``True`` requires ``torch._fused_adamw_``; ``None`` uses it where the tensors allow.
        capturable: Compute the bias corrections on the step tensors (no host sync; ``torch.compile``).

    Raises:
        ValueError: If ``foreach`` and ``fused`` are both ``True``.
        RuntimeError: If ``fused=True`` and a tensor's device or dtype has no fused kernel.

    Example:
        ```python
        import torch
        import hf_optim

        p, g = torch.ones(3), torch.full((3,), 0.5)
        m, v, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
        hf_optim.adamw([p], [g], [m], [v], [step], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
        assert step.item() == 1 and torch.allclose(m, torch.full((3,), 0.05))
        ```
    """
    check_flags(foreach, fused)
    tensors = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):
        if impl == "fused" and (capturable or (weight_decay > 0 and lr * weight_decay == 1.0)):
            # capturable: the re-parametrisation needs t as a number; lr*wd == 1: the decay factor is 0 and no
            # re-parametrisation of the fused kernel exists
            impl = "multi_tensor"
        _IMPLEMENTATIONS[impl](
            *bucket,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            capturable=capturable,
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
    capturable: bool,
) -> None:
    # The reference: transformers 4.x AdamW.step, op for op.
    on_tensors = tensor_steps(capturable)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step_t += 1
        exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        if on_tensors and correct_bias:  # the same step size, as a tensor
            (neg_step_size,) = adam_step_sizes([step_t], lr=lr, beta1=beta1, beta2=beta2)
            param.add_(exp_avg / denom * neg_step_size)
        else:
            step_size = lr
            if correct_bias:
                step = step_t.item()
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
    capturable: bool,
) -> None:
    # The reference's ops, one foreach call per op, for tensors of one device and dtype.
    set_steps(state_steps)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if correct_bias and tensor_steps(capturable):
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(updates, adam_step_sizes(state_steps, lr=lr, beta1=beta1, beta2=beta2))
        torch._foreach_add_(params, updates)
    elif correct_bias:
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
    capturable: bool,
) -> None:
    # torch._fused_adamw_ computes, with bias corrections bc1 = 1-b1^t and bc2 = 1-b2^t:
    #   p *= 1 - lr'*wd';  p -= lr'/bc1 * m / (sqrt(v)/sqrt(bc2) + eps')
    # The legacy update, multiplied out, is:
    #   p = (1 - lr*wd) * p - (1 - lr*wd) * s * m / (sqrt(v) + eps),   s = lr*sqrt(bc2)/bc1 (or lr)
    # so eps' = eps/sqrt(bc2), lr' = (lr or lr*bc1/sqrt(bc2)) * (1 - lr*wd) and wd' = lr*wd / lr'.
    del capturable  # adamw() sends capturable work to the multi-tensor path
    shrink = 1.0 - lr * weight_decay

    def hyperparameters(t: float) -> tuple[float, float, float]:
        sqrt_bc2 = math.sqrt(1.0 - beta2**t)
        kernel_lr = lr if correct_bias else lr * (1.0 - beta1**t) / sqrt_bc2
        kernel_lr *= shrink
        kernel_wd = lr * weight_decay / kernel_lr if kernel_lr != 0.0 else 0.0
        return kernel_lr, eps / sqrt_bc2, kernel_wd

    set_steps(state_steps)
    fused_adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], state_steps,
        beta1=beta1, beta2=beta2, hyperparameters=hyperparameters,
    )  # fmt: skip


_IMPLEMENTATIONS = {
    "single_tensor": _single_tensor_adamw,
    "multi_tensor": _multi_tensor_adamw,
    "fused": _fused_adamw,
}
