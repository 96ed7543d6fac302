"""Pieces shared by the optimizers: validation, state, implementation choice, torch's fused kernel, Keras clipping.

The legacy algorithms differ from torch's AdamW only in where ``eps`` sits, in bias correction and in when weight
decay is applied; each is an exact re-parametrisation of ``torch._fused_adamw_`` per step value ``t``. The
optimizers give :func:`fused_adamw` a function that turns ``t`` into the kernel's ``(lr, eps, weight_decay)``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from hf_optim.schedules.pretrained_bert import LRSchedule, resolve_schedule

try:  # private torch module: looked up lazily so that a torch without it still imports hf_optim
    import torch.utils._foreach_utils as _torch_foreach_utils
except ImportError:  # pragma: no cover - depends on the torch build
    _torch_foreach_utils = None  # type: ignore[assignment]  # torch build without the module

logger = logging.getLogger(__name__)

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
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    allowed = f"[{low}, {high})" if high is not None else f"[{low}, inf)"
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be finite and in {allowed}, got {value!r}")


def check_decay(lr: object, weight_decay: object) -> None:
    """``ValueError`` unless ``lr * weight_decay <= 1`` (both numbers already checked).

    Every optimizer here multiplies a parameter by ``1 - s * weight_decay`` per step, with ``s`` the (scheduled)
    lr, at most ``lr``. Above 1 the factor is negative: each step flips the parameters' sign, and past 2 their
    magnitude grows geometrically until it is no longer finite (``weight_decay=1e308`` does it in one step).
    """
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    wd_value = weight_decay.item() if isinstance(weight_decay, Tensor) else weight_decay
    if (
        isinstance(lr_value, (int, float))
        and isinstance(wd_value, (int, float))
        and lr_value * wd_value > 1.0
    ):
        raise ValueError(
            f"lr * weight_decay must be <= 1 (the per-step decay factor 1 - lr*weight_decay would be negative), "
            f"got lr={lr_value!r}, weight_decay={wd_value!r}"
        )


def check_flags(foreach: bool | None, fused: bool | None) -> None:
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True: pick one implementation")


# --- torch's private APIs, each behind a guard: a torch without one runs a slower path, never fails to import ---

# The foreach ops the multi-tensor paths call.
_FOREACH_OPS = (
    "_foreach_add_", "_foreach_addcdiv_", "_foreach_addcmul_", "_foreach_div", "_foreach_lerp_", "_foreach_maximum_",
    "_foreach_mul_", "_foreach_sqrt",
)  # fmt: skip
_logged_fallbacks: set[str] = set()


def _log_fallback_once(missing: str, consequence: str) -> None:
    if missing not in _logged_fallbacks:
        _logged_fallbacks.add(missing)
        logger.info("torch %s has no %s: %s", torch.__version__, missing, consequence)


def fused_kernel_devices() -> list[str] | None:
    """Device types ``torch._fused_adamw_`` supports, or ``None`` when this torch lacks the kernel or the list.

    ``None`` makes every fused choice fall back to the multi-tensor path (logged once at INFO).
    """
    if getattr(torch, "_fused_adamw_", None) is None:
        _log_fallback_once("torch._fused_adamw_", "the fused paths run the multi-tensor path instead")
        return None
    supported = getattr(_torch_foreach_utils, "_get_fused_kernels_supported_devices", None)
    if supported is None:
        _log_fallback_once(
            "torch.utils._foreach_utils._get_fused_kernels_supported_devices",
            "the fused paths run the multi-tensor path instead",
        )
        return None
    return list(supported())


def foreach_available() -> bool:
    """Whether this torch has every ``torch._foreach_*`` op the multi-tensor paths use (else: reference path)."""
    missing = [name for name in _FOREACH_OPS if getattr(torch, name, None) is None]
    if missing:
        _log_fallback_once(
            ", ".join(f"torch.{name}" for name in missing),
            "the multi-tensor paths run the reference path instead",
        )
        return False
    return True


def group_by_device_and_dtype(
    tensors: list[list[Tensor]],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel tensor lists by the (device, dtype) of the first list's tensors; empty lists stay empty.

    torch's ``Optimizer._group_tensors_by_device_and_dtype`` when present, else the same in Python.
    """
    torch_grouping = getattr(Optimizer, "_group_tensors_by_device_and_dtype", None)
    if torch_grouping is not None:
        return {key: bucket for key, (bucket, _) in torch_grouping(tensors).items()}
    _log_fallback_once(
        "torch.optim.Optimizer._group_tensors_by_device_and_dtype", "tensors are grouped in Python instead"
    )
    indices: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors[0]):
        indices[(t.device, t.dtype)].append(i)
    return {key: [[x[i] for i in idx] if x else [] for x in tensors] for key, idx in indices.items()}


def bucket_implementation(
    device: torch.device, dtype: torch.dtype, foreach: bool | None, fused: bool | None
) -> Implementation:
    """Resolve ``foreach`` / ``fused`` for tensors of one device and dtype as torch.optim does, fused by default.

    ``fused=True``: the fused kernel (error if the tensors cannot use it); ``foreach=True``: multi-tensor;
    ``foreach=False`` (fused not True): the per-tensor reference; both ``None``: fused when the tensors can use it,
    else multi-tensor. A torch without the fused kernel or the foreach ops runs the next slower path.
    """
    if fused or (fused is None and foreach is None):
        supported = fused_kernel_devices()
        if supported is not None:
            if device.type in supported and dtype.is_floating_point:
                return "fused"
            if fused:
                raise RuntimeError(
                    f"fused=True needs floating-point parameters on one of {supported}, got {dtype} on {device}; "
                    "use fused=None to fall back"
                )
    if foreach is False or dtype.is_complex or not foreach_available():
        return "single_tensor"
    return "multi_tensor"


def group_buckets(
    tensors: list[list[Tensor]], foreach: bool | None, fused: bool | None
) -> list[tuple[Implementation, list[list[Tensor]]]]:
    """Split parallel tensor lists by (device, dtype) and pick each bucket's implementation.

    Under ``torch.compile`` the lists stay whole (inductor groups and fuses them itself, as torch.optim does) and
    the fused choice runs the multi-tensor code: the fused re-parametrisations need the step as a Python number.
    """
    if foreach is False and not fused:
        return [("single_tensor", tensors)]
    if torch.compiler.is_compiling():
        return [("multi_tensor" if foreach_available() else "single_tensor", tensors)]
    return [
        (bucket_implementation(device, dtype, foreach, fused), bucket)
        for (device, dtype), bucket in group_by_device_and_dtype(tensors).items()
    ]


def set_steps(steps: list[Tensor], value: float | Tensor | None = None) -> None:
    """Add 1 to each step tensor (``value=None``), or set each to ``value``."""
    if value is None and foreach_available():
        torch._foreach_add_(steps, 1)
        return
    for step in steps:
        if value is None:
            step.add_(1)
        elif isinstance(value, Tensor):
            step.copy_(value)
        else:
            step.fill_(value)


def tensor_steps(capturable: bool) -> bool:
    """Whether bias corrections are computed on the step tensors (no host sync) rather than as Python floats.

    So with ``capturable=True`` and under ``torch.compile``, where reading the step back (``.item()``,
    ``.tolist()``) would be a graph break or a data-dependent value, depending on the torch version.
    """
    return capturable or torch.compiler.is_compiling()


def adam_step_sizes(steps: list[Tensor], *, lr: float, beta1: float, beta2: float) -> list[Tensor]:
    """``-lr * sqrt(1-beta2^t) / (1-beta1^t)`` per step tensor, as 0-dim tensors on the steps' devices.

    Computed in float64 (float32 where the device has no float64) so that the result rounds like the Python-float
    computation of the eager paths.
    """
    sizes = []
    for step in steps:
        t = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
        sizes.append((1.0 - beta2**t).sqrt() * -lr / (1.0 - beta1**t))
    return sizes


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


def check_loaded_state(
    optimizer: Optimizer,
    state_dict: Mapping[str, Any],
    state_keys: Callable[[dict[str, Any]], tuple[set[str], set[str]]],
) -> None:
    """Raise ``ValueError`` when a parameter's saved state has keys the optimizer does not use or lacks one it needs.

    ``state_keys(group)`` gives the ``(required, optional)`` state keys for the parameters of a saved param group
    (completed with the optimizer's defaults). Also checks that each saved moment is a tensor of its parameter's
    shape. The message lists every parameter at fault (by name when the state_dict has ``param_names``); called
    before anything is loaded, so a refused state_dict leaves the optimizer as it was.
    """
    name = type(optimizer).__name__
    state, saved_groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(saved_groups, (list, tuple)):
        raise ValueError(
            f"{name}.load_state_dict needs a dict with 'state' and 'param_groups', got {sorted(state_dict)}"
        )
    problems = []
    for gi, saved in enumerate(saved_groups):
        required, optional = state_keys({**optimizer.defaults, **saved})
        names = saved.get("param_names")
        live = optimizer.param_groups[gi]["params"] if gi < len(optimizer.param_groups) else []
        for i, pid in enumerate(saved.get("params", [])):
            s = state.get(pid)
            if not s:
                continue
            label = repr(names[i]) if names and i < len(names) else f"#{pid}"
            keys = set(s)
            unexpected, missing = sorted(keys - required - optional), sorted(required - keys)
            if unexpected or missing:
                problems.append(f"parameter {label}: unexpected keys {unexpected}, missing keys {missing}")
                continue
            step = s.get("step")
            if "step" in s and not (
                (isinstance(step, (int, float)) and not isinstance(step, bool))
                or (isinstance(step, Tensor) and step.numel() == 1)
            ):
                problems.append(f"parameter {label}: 'step' must be a number or a one-element tensor")
            for key in sorted(keys - {"step"}):
                value = s[key]
                if not isinstance(value, Tensor):
                    problems.append(f"parameter {label}: {key!r} is a {type(value).__name__}, not a tensor")
                elif i < len(live) and value.shape != live[i].shape:
                    problems.append(
                        f"parameter {label}: {key!r} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(live[i].shape)}"
                    )
    if problems:
        expected = sorted(set().union(*state_keys(dict(optimizer.defaults))))
        raise ValueError(
            f"{name}.load_state_dict: the state does not match what {name} keeps per parameter ({expected}); "
            "nothing was loaded:\n  " + "\n  ".join(problems)
        )


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
        torch._fused_adamw_(  # bucket_implementation picks "fused" only when it exists
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
        norms = _norms(grads)
        grads = [g * clipnorm / torch.clamp(n, min=clipnorm) for g, n in zip(grads, norms, strict=True)]
    if global_clipnorm is not None and grads:
        norms = _norms(grads)
        global_norm = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]))
        scale = global_clipnorm * torch.minimum(1.0 / global_norm, torch.tensor(1.0 / global_clipnorm))
        scale = torch.where(torch.isfinite(global_norm), scale, torch.tensor(float("nan")))
        grads = [g * scale for g in grads]
    return grads


def _norms(grads: list[Tensor]) -> list[Tensor]:
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is None:
        _log_fallback_once("torch._foreach_norm", "gradient norms are computed one tensor at a time")
        return [torch.linalg.vector_norm(g) for g in grads]
    return list(foreach_norm(grads))


# --- the legacy Adams (BertAdam, OpenAIAdam): group checks, state, per-parameter clipping ---


def check_legacy_adam_group(group: Mapping[str, Any]) -> None:
    """The bounds of a BertAdam / OpenAIAdam param group, at construction and at load.

    ``lr`` and ``e`` finite and >= 0, ``b1`` / ``b2`` in [0, 1), ``weight_decay`` finite (<= 0 is "off", as in
    the legacy optimizers) with ``lr * weight_decay <= 1`` (:func:`check_decay`), ``max_grad_norm`` a number that
    is not NaN (<= 0 is "off"; NaN would switch clipping off silently), ``schedule`` an :class:`LRSchedule`
    whose attributes pass its :meth:`~LRSchedule.check_fields`.
    """
    check_number("lr", group["lr"])
    check_number("b1", group["b1"], high=1.0)
    check_number("b2", group["b2"], high=1.0)
    check_number("e", group["e"])
    check_number("weight_decay", group["weight_decay"], low=-math.inf)
    check_decay(group["lr"], group["weight_decay"])
    max_grad_norm = group["max_grad_norm"]
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"max_grad_norm must be a real number, got {type(max_grad_norm).__name__}")
    if math.isnan(max_grad_norm):
        raise ValueError("max_grad_norm must not be NaN (<= 0 switches clipping off)")
    if not isinstance(group["schedule"], LRSchedule):
        raise TypeError(
            f"schedule must be an LRSchedule object in a param group, got {type(group['schedule']).__name__} "
            f"{str(group['schedule'])[:40]!r}"
        )
    group["schedule"].check_fields(vars(group["schedule"]))
    check_flags(group["foreach"], group["fused"])


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
    """What BertAdam and OpenAIAdam share: the group checks (:func:`check_legacy_adam_group`) for new groups and
    loaded ones, a legacy ``state_dict``'s missing keys, ``get_lr``.

    Their groups hold ``lr``, ``schedule`` (an :class:`LRSchedule`), ``b1``, ``b2``, ``e``, ``weight_decay``,
    ``max_grad_norm``, ``foreach`` and ``fused``; the subclass constructors set the defaults and ``step`` holds the
    algorithm. A group given to the constructor or ``add_param_group`` may name its schedule (a ``SCHEDULES``
    key); a loaded group must hold a schedule object.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if not isinstance(group["schedule"], LRSchedule):
                group["schedule"] = resolve_schedule(group["schedule"], -1, -1)
            check_legacy_adam_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Every group checked before anything changes (torch keeps missing keys from the live group).
        for i, group in enumerate(state_dict.get("param_groups", ())):
            live = self.param_groups[i] if i < len(self.param_groups) else self.defaults
            try:
                check_legacy_adam_group({**self.defaults, **live, **group})
            except (TypeError, ValueError) as err:
                raise type(err)(f"param group {i}: {err}") from None
        super().load_state_dict(state_dict)

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
