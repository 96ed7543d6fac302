"""Pieces shared by the optimizers: validation, state, implementation choice, torch's fused kernel, Keras clipping.

The legacy algorithms differ from torch's AdamW only in where ``eps`` sits, in bias correction and in when weight
decay is applied; each is an exact re-parametrisation of ``torch._fused_adamw_`` per step value ``t``. The
optimizers give :func:`fused_adamw` a function that turns ``t`` into the kernel's ``(lr, eps, weight_decay)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

Implementation = Literal["single_tensor", "multi_tensor", "fused"]

# (step t) -> (lr, eps, weight_decay) for torch._fused_adamw_
KernelHyperparameters = Callable[[float], tuple[float, float, float]]


def check_number(name: str, value: object, *, low: float = 0.0, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in ``[low, high)`` (``[low, inf)`` without high)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    allowed = f"[{low}, {high})" if high is not None else f"[{low}, inf)"
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be finite and in {allowed}, got {value!r}")


def check_flags(foreach: bool | None, fused: bool | None) -> None:
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True: pick one implementation")


def bucket_implementation(
    device: torch.device, dtype: torch.dtype, foreach: bool | None, fused: bool | None
) -> Implementation:
    """Resolve ``foreach`` / ``fused`` for tensors of one device and dtype as torch.optim does, fused by default.

    ``fused=True``: the fused kernel (error if the tensors cannot use it); ``foreach=True``: multi-tensor;
    ``foreach=False`` (fused not True): the per-tensor reference; both ``None``: fused when the tensors can use it,
    else multi-tensor.
    """
    supported = _get_fused_kernels_supported_devices()
    fusable = device.type in supported and dtype.is_floating_point
    if fused or (fused is None and foreach is None):
        if fusable:
            return "fused"
        if fused:
            raise RuntimeError(
                f"fused=True needs floating-point parameters on one of {supported}, got {dtype} on {device}; "
                "use fused=None to fall back"
            )
    if foreach is False or dtype.is_complex:
        return "single_tensor"
    return "multi_tensor"


def group_buckets(
    tensors: list[list[Tensor]], foreach: bool | None, fused: bool | None
) -> list[tuple[Implementation, list[list[Tensor]]]]:
    """Split parallel tensor lists by (device, dtype) and pick each bucket's implementation."""
    if foreach is False and not fused:
        return [("single_tensor", tensors)]
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensors)  # type: ignore[arg-type]
    return [
        (bucket_implementation(device, dtype, foreach, fused), bucket)  # type: ignore[misc]
        for (device, dtype), (bucket, _) in grouped.items()
    ]


def gather_state(
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    grad_of: Callable[[Tensor], Tensor | None],
    optimizer: str,
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """Parameters of ``group`` that have a gradient, their gradients and their state (created when missing).

    Sparse gradients raise, naming the parameter. New state lives on the parameter's device: moments in its
    dtype, ``step`` a float32 scalar.
    """
    params, grads = [], []
    for p in group["params"]:
        g = grad_of(p)
        if g is not None:
            params.append(p)
            grads.append(g)
    if any(g.is_sparse for g in grads):
        i = next(i for i, p in enumerate(group["params"]) if (g := grad_of(p)) is not None and g.is_sparse)
        names = group.get("param_names")
        raise RuntimeError(
            f"{optimizer} does not support sparse gradients (parameter {names[i] if names else f'#{i}'}); "
            "use torch.optim.SparseAdam or dense gradients"
        )
    states = [state[p] for p in params]
    for p, s in zip(params, states, strict=True):
        if not s:
            s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return params, grads, states


def steps_to_tensors(state: dict[Tensor, dict[str, Any]]) -> None:
    """After loading: ``step`` as a float32 tensor on its parameter's device, where the kernels read it.

    transformers 4.x saved ``step`` as a Python int; torch keeps a loaded ``step`` where it was saved (the CPU).
    """
    for p, s in state.items():
        step = s.get("step")
        if step is None:
            continue
        if not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=torch.float32)
        s["step"] = step.to(p.device)


def fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    hyperparameters: KernelHyperparameters,
    amsgrad: bool = False,
) -> None:
    """Run ``torch._fused_adamw_`` on tensors of one device and dtype, already advanced to their new step.

    ``state_steps`` must already hold the new step ``t``: the kernel reads it for bias correction but does not
    increment it. ``hyperparameters(t)`` gives the kernel's lr, eps and weight decay for that step; one kernel
    call per distinct ``t`` (one in the usual case).
    """
    tensors = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    for t, idx in _split_by_step(state_steps):
        lr, eps, weight_decay = hyperparameters(t)
        p, g, m, v, vmax, steps = (
            tensors if idx is None else [[x[i] for i in idx] if x else x for x in tensors]
        )
        torch._fused_adamw_(
            p, g, m, v, vmax if amsgrad else [], steps,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            amsgrad=amsgrad, maximize=False,
        )  # fmt: skip


def _split_by_step(steps: list[Tensor]) -> list[tuple[float, list[int] | None]]:
    """``[(t, None)]`` when every tensor is at the same step (the usual case), else indices per step value."""
    values = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
    if values.count(values[0]) == len(values):
        return [(values[0], None)]
    buckets: dict[float, list[int]] = defaultdict(list)
    for i, t in enumerate(values):
        buckets[t].append(i)
    return list(buckets.items())


# --- Keras gradient transforms (tf.clip_by_value, tf.clip_by_norm, tf.clip_by_global_norm) ---


def keras_clip_gradients(
    grads: list[Tensor],
    *,
    clipvalue: float | None,
    clipnorm: float | None,
    global_clipnorm: float | None,
) -> list[Tensor]:
    """Keras' gradient transforms, in Keras' order (value, then norm, then global norm), as new tensors.

    ``clip_by_norm``: ``g * c / max(||g||, c)``; ``clip_by_global_norm``: ``g * c * min(1/N, 1/c)`` with ``N`` the
    norm of all gradients together (NaN everywhere when ``N`` is not finite, as in TensorFlow).
    """
    if clipvalue is not None:
        grads = [g.clamp(-clipvalue, clipvalue) for g in grads]
    if clipnorm is not None:
        norms = torch._foreach_norm(grads)
        grads = [g * clipnorm / torch.clamp(n, min=clipnorm) for g, n in zip(grads, norms, strict=True)]
    if global_clipnorm is not None and grads:
        norms = torch._foreach_norm(grads)
        global_norm = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]))
        scale = global_clipnorm * torch.minimum(1.0 / global_norm, torch.tensor(1.0 / global_clipnorm))
        scale = torch.where(torch.isfinite(global_norm), scale, torch.tensor(float("nan")))
        grads = list(torch._foreach_mul(grads, scale))
    return grads
