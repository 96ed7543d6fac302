"""``AdamWeightDecay``: transformers 4.x's TensorFlow optimizer (Keras Adam + decoupled decay by name) in PyTorch.

For the parameters of one ``step()`` (``t`` = the optimizer's iteration count + 1, shared by all of them, as in
Keras)::

    g = clip(g)                                      # clipvalue, clipnorm, global_clipnorm (Keras order)
    p -= lr * weight_decay_rate * p                  # BEFORE the update; only where decay applies by name
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g*g                            # amsgrad: vhat = max(vhat, v) replaces v below
    p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + epsilon)

Decay applies to a parameter by its name (``include_in_weight_decay`` wins over ``exclude_from_weight_decay``),
see :func:`hf_optim.param_groups.decay_applies`. The fast path is ``torch._fused_adamw_`` with
``eps' = epsilon / sqrt(1-b2^t)``: exactly this algorithm, re-parametrised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
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
    keras_clip_gradients,
    set_steps,
    steps_to_tensors,
    tensor_steps,
)
from hf_optim.param_groups import compile_patterns, decay_applies

__all__ = ["AdamWeightDecay", "adam_weight_decay"]

# Optimizer-level options that are not param-group hyperparameters.
_KERAS_OPTIONS = (
    "name",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "include_in_weight_decay",
    "exclude_from_weight_decay",
    "_include",
    "_exclude",
)
# Keras argument name -> param-group key (torch's names, so LR schedulers, Trainer and Accelerate work).
_KERAS_TO_TORCH = {"learning_rate": "lr", "epsilon": "eps", "weight_decay_rate": "weight_decay"}


class AdamWeightDecay(Optimizer):
    """transformers 4.x ``AdamWeightDecay`` (TensorFlow), ported to PyTorch with the same math.

    Args:
        params: ``model.named_parameters()`` (names are needed for the include/exclude patterns), tensors, or
            param-group dicts; group dicts may use the Keras names (``learning_rate``, ``beta_1``, ``beta_2``,
            ``epsilon``, ``weight_decay_rate``) or torch's (``lr``, ``betas``, ``eps``, ``weight_decay``).
        learning_rate: Keras Adam's learning rate, >= 0.
        beta_1: Decay of the first moment, in [0, 1).
        beta_2: Decay of the second moment, in [0, 1).
        epsilon: Added to ``sqrt(v_hat)``, >= 0.
        amsgrad: Keep the maximum of the second moments (Keras's AMSGrad).
        weight_decay_rate: decoupled decay, applied before the Adam update with the scheduled learning rate;
            ``learning_rate * weight_decay_rate`` at most 1.
        include_in_weight_decay: regexes; a matching parameter name is decayed even if excluded.
        exclude_from_weight_decay: regexes; a matching parameter name is not decayed.
        name: the optimizer's name (kept for Keras parity).
        clipnorm: Clip each gradient to this norm (exclusive with ``global_clipnorm``).
        clipvalue: Clip each gradient element to ``[-clipvalue, clipvalue]``.
        global_clipnorm: Clip all gradients together to this global norm.
        foreach: Implementation choice as in torch.optim; ``False`` (with ``fused`` not ``True``) runs the
            per-tensor reference.
        fused: ``None`` (default) uses the fused kernel where the tensors allow.
        capturable: keep the step count on the step tensors (no host sync; CUDA graphs). Always the case under
            ``torch.compile``.

    Raises:
        TypeError: If a hyperparameter is not a real number (or a flag not a bool).
        ValueError: If a hyperparameter is out of its range, or ``foreach`` and ``fused`` are both ``True``, or
            ``clipnorm`` and ``global_clipnorm`` are both set.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(4, 2)
        optimizer = hf_optim.AdamWeightDecay(
            model.named_parameters(), learning_rate=1e-3, weight_decay_rate=0.01, exclude_from_weight_decay=["bias"]
        )
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        ```
    """

    def __init__(
        self,
        params: ParamsT,
        learning_rate: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay_rate: float = 0.0,
        include_in_weight_decay: list[str] | None = None,
        exclude_from_weight_decay: list[str] | None = None,
        name: str = "AdamWeightDecay",
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
    ) -> None:
        check_flags(foreach, fused)
        if clipnorm is not None and global_clipnorm is not None:
            raise ValueError("clipnorm and global_clipnorm cannot both be set: pick one")
        for arg, value in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        ):
            if value is not None:
                check_number(arg, value)
        self.name = name
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.include_in_weight_decay = include_in_weight_decay
        self.exclude_from_weight_decay = exclude_from_weight_decay
        self._include = compile_patterns(include_in_weight_decay, "include_in_weight_decay")
        self._exclude = compile_patterns(exclude_from_weight_decay, "exclude_from_weight_decay")
        # Keras' iteration count, cached; None: recompute from the step tensors. A dict, not an attribute, because
        # torch.compile replays item assignments made inside a compiled step() but not attribute assignments.
        self._count: dict[str, int | None] = {"iterations": 0}
        self._decay: dict[Tensor, bool] = {}  # whether each parameter is decayed, decided once by name
        defaults = {
            "lr": learning_rate,
            "betas": (beta_1, beta_2),
            "eps": epsilon,
            "weight_decay": weight_decay_rate,
            "amsgrad": amsgrad,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(_to_torch_keys(param_group, self.defaults["betas"]))
        group = self.param_groups[-1]
        try:
            _check_group(group)
            if (self._include or self._exclude) and "param_names" not in group:
                raise ValueError(
                    "include_in_weight_decay / exclude_from_weight_decay match parameter names: "
                    "pass model.named_parameters() (or (name, tensor) pairs) instead of bare tensors"
                )
        except (TypeError, ValueError):
            self.param_groups.pop()  # refused: the optimizer stays as it was
            raise
        self._set_decay(group)

    def _set_decay(self, group: dict[str, Any]) -> None:
        # The name rule, decided once per parameter; the group's current rate is applied at each step, so a rate
        # of 0 means no decay then (and a rate changed later takes effect), as in Keras.
        names = group.get("param_names") or [""] * len(group["params"])
        for p, name in zip(group["params"], names, strict=True):
            self._decay[p] = decay_applies(
                name, weight_decay=1.0, include=self._include, exclude=self._exclude
            )

    def _decay_of(self, p: Tensor) -> bool:
        """Whether ``p`` decays. A parameter put into a group after construction (DeepSpeed ZeRO replaces each
        group's parameters with one flat partition) has no name: it decays unless names select what decays."""
        if p not in self._decay:
            if self._include or self._exclude:
                raise ValueError(
                    "include_in_weight_decay / exclude_from_weight_decay select parameters by name, but this "
                    "parameter was added after construction (under DeepSpeed ZeRO the optimizer steps flat "
                    "partitions): put the parameters that do not decay in a group with weight_decay_rate=0"
                )
            self._decay[p] = True
        return self._decay[p]

    def __getstate__(
        self,
    ) -> dict[str, Any]:  # torch keeps only defaults/state/param_groups; keep the Keras options
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in _KERAS_OPTIONS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # keys an older state_dict lacks
            group.setdefault("capturable", False)
        self._decay = {}
        for group in self.param_groups:
            self._set_decay(group)
        steps_to_tensors(self.state)
        self._count = {"iterations": None}  # recomputed from the loaded steps

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by this class.

        Raises ``ValueError`` (loading nothing) when a parameter's state has other keys than ``step``,
        ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), or a moment of the wrong shape. Runs
        after the caller's own ``register_load_state_dict_pre_hook`` hooks.
        """
        handle = self.register_load_state_dict_pre_hook(_check_loaded)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    @property
    def iterations(self) -> int:
        """Number of steps applied so far (Keras' ``optimizer.iterations``)."""
        if self._count["iterations"] is None:
            steps = [int(s["step"]) for s in self.state.values() if "step" in s]
            self._count["iterations"] = max(steps, default=0)
        return self._count["iterations"]  # type: ignore[return-value]  # set to an int just above

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch overloads step() on closure
        """Apply each parameter's ``.grad``; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply(lambda p: p.grad)
        return loss

    @torch.no_grad()
    def apply_gradients(
        self,
        grads_and_vars: Iterable[tuple[Tensor | None, Tensor]],
        name: str | None = None,
        experimental_aggregate_gradients: bool = True,
    ) -> int:
        """Keras-style: apply ``(gradient, parameter)`` pairs in one step; returns the new iteration count.

        When a ``torch.distributed`` process group is initialized the gradients are first summed across processes
        (all-reduce SUM), unless ``experimental_aggregate_gradients=False``. Pairs with a ``None`` gradient are
        skipped; ``.grad`` is neither read nor changed.
        """
        del name  # Keras' name scope; nothing to name here
        try:
            pairs = list(grads_and_vars)
        except TypeError:
            raise TypeError("grads_and_vars must be an iterable of (gradient, parameter) pairs") from None
        managed = {p for group in self.param_groups for p in group["params"]}
        grads: dict[Tensor, Tensor] = {}
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"grads_and_vars must hold (gradient, parameter) pairs, got {pair!r}")
            grad, var = pair
            if not isinstance(var, Tensor) or not (grad is None or isinstance(grad, Tensor)):
                raise TypeError(
                    f"each pair must be (Tensor or None, Tensor), got ({type(grad).__name__}, {type(var).__name__})"
                )
            if var not in managed:
                raise ValueError("apply_gradients got a parameter this optimizer does not manage")
            if grad is not None:
                if grad.shape != var.shape:
                    raise ValueError(
                        f"gradient shape {tuple(grad.shape)} != parameter shape {tuple(var.shape)}"
                    )
                grads[var] = grad
        if not grads:
            raise ValueError("No gradients provided for any parameter")
        if experimental_aggregate_gradients and dist.is_available() and dist.is_initialized():
            grads = {p: g.clone() for p, g in grads.items()}
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
        self._apply(grads.get)
        return self.iterations

    def _apply(self, grad_of: Callable[[Tensor], Tensor | None]) -> None:
        gathered = []
        for group in self.param_groups:
            params, grads, states = gather_state(self.state, group, grad_of, "AdamWeightDecay")
            if params:
                gathered.append((group, params, grads, states))
        if not gathered:
            return
        if self.clipvalue is not None or self.clipnorm is not None or self.global_clipnorm is not None:
            clipped = iter(
                keras_clip_gradients(
                    [g for _, _, grads, _ in gathered for g in grads],
                    clipvalue=self.clipvalue,
                    clipnorm=self.clipnorm,
                    global_clipnorm=self.global_clipnorm,
                )
            )
            gathered = [(grp, ps, [next(clipped) for _ in gs], sts) for grp, ps, gs, sts in gathered]
        t: int | Tensor
        if tensor_steps(any(group["capturable"] for group, *_ in gathered)):
            # The optimizer's count is the largest step of any parameter: each step() sets its parameters' steps
            # to it. Kept on the step tensors, read back only by ``iterations``.
            device = gathered[0][1][0].device
            t = torch.stack([s["step"].to(device) for s in self.state.values() if "step" in s]).max() + 1
            self._count["iterations"] = None
        else:
            t = self.iterations + 1
        for group, params, grads, states in gathered:
            self._update_group(group, params, grads, states, t)
        if isinstance(t, int):
            self._count["iterations"] = t

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        t: int | Tensor,
    ) -> None:
        amsgrad = group["amsgrad"]
        if amsgrad:
            for p, s in zip(params, states, strict=True):
                if "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # every updated parameter is at the optimizer's step t
        set_steps([s["step"] for s in states], t if isinstance(t, Tensor) else float(t))
        decays = [self._decay_of(p) for p in params]
        beta1, beta2 = group["betas"]
        for decay in (True, False):
            if decay not in decays:
                continue
            idx = [i for i, d in enumerate(decays) if d is decay]
            sub = [states[i] for i in idx]
            adam_weight_decay(
                [params[i] for i in idx], [grads[i] for i in idx],
                [s["exp_avg"] for s in sub], [s["exp_avg_sq"] for s in sub],
                [s["max_exp_avg_sq"] for s in sub] if amsgrad else None, [s["step"] for s in sub],
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"] if decay else 0.0, amsgrad=amsgrad,
                foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
            )  # fmt: skip


def _check_group(group: dict[str, Any]) -> None:
    check_number("learning_rate", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta_1, beta_2), got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta_1, beta_2), got {betas!r}")
    check_number("beta_1", betas[0], high=1.0)
    check_number("beta_2", betas[1], high=1.0)
    check_number("epsilon", group["eps"])
    check_number("weight_decay_rate", group["weight_decay"])
    check_decay(group["lr"], group["weight_decay"])
    check_flags(group["foreach"], group["fused"])
    for key in ("amsgrad", "capturable"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {type(group[key]).__name__}")


def _state_keys(group: dict[str, Any]) -> tuple[set[str], set[str]]:
    # max_exp_avg_sq appears with amsgrad (created at the first amsgrad step, so optional)
    return {"step", "exp_avg", "exp_avg_sq"}, {"max_exp_avg_sq"} if group.get("amsgrad") else set()


def _check_loaded(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    check_loaded_state(optimizer, state_dict, _state_keys)
    for saved in state_dict["param_groups"]:
        _check_group({**optimizer.defaults, **saved})


def _to_torch_keys(group: dict[str, Any], default_betas: tuple[float, float]) -> dict[str, Any]:
    """Accept Keras names in a param-group dict; ``beta_1``/``beta_2`` become ``betas``."""
    group = dict(group)
    for keras, torch_key in _KERAS_TO_TORCH.items():
        if keras in group:
            if torch_key in group:
                raise ValueError(f"param group sets both {keras!r} and {torch_key!r}: use one")
            group[torch_key] = group.pop(keras)
    if "beta_1" in group or "beta_2" in group:
        if "betas" in group:
            raise ValueError("param group sets both beta_1/beta_2 and betas: use one")
        group["betas"] = (group.pop("beta_1", default_betas[0]), group.pop("beta_2", default_betas[1]))
    return group


def adam_weight_decay(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
) -> None:
    """Functional ``AdamWeightDecay`` update for tensors whose ``state_steps`` already hold the step ``t``.

    The loop body of :class:`AdamWeightDecay`, for code that keeps its own state. ``weight_decay`` applies to every
    tensor given (split decayed and non-decayed parameters into two calls).

    Args:
        params: The parameters to update.
        grads: Their gradients.
        exp_avgs: The first moments, updated in place.
        exp_avg_sqs: The second moments, updated in place.
        max_exp_avg_sqs: The running maxima of the second moments (``amsgrad``), else ``None``.
        state_steps: Step counters, already holding this step ``t``.
        lr: Learning rate (the scheduled one: the decay uses it too).
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        eps: Added to ``sqrt(v_hat)``.
        weight_decay: Decoupled decay, applied before the Adam update.
        amsgrad: Use ``max_exp_avg_sqs``.
        foreach: ``False`` (with ``fused`` not ``True``) runs the per-tensor reference.
        fused: ``None`` picks the fastest implementation the tensors support.
        capturable: Compute the bias corrections on the step tensors (no host sync; ``torch.compile``).

    Raises:
        ValueError: If ``foreach`` and ``fused`` are both ``True``, or ``amsgrad`` without ``max_exp_avg_sqs``.
        RuntimeError: If ``fused=True`` and a tensor's device or dtype has no fused kernel.

    Example:
        ```python
        import torch
        import hf_optim

        p, g = torch.ones(3), torch.full((3,), 0.5)
        m, v, step = torch.zeros(3), torch.zeros(3), torch.ones(())
        hf_optim.adam_weight_decay(
            [p], [g], [m], [v], None, [step], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0
        )
        assert torch.all(p < 1)
        ```
    """
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    check_flags(foreach, fused)
    tensors = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], state_steps]
    for impl, bucket in group_buckets(tensors, foreach, fused):
        if impl == "fused" and capturable:  # the re-parametrisation needs t as a number
            impl = "multi_tensor"
        _IMPLEMENTATIONS[impl](
            *bucket, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            capturable=capturable,
        )  # fmt: skip


def _keras_lr(lr: float, beta1: float, beta2: float, t: float) -> float:
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def _single_tensor_adam_weight_decay(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    capturable: bool,
) -> None:
    # The reference, following TensorFlow's ops: var.assign_sub(lr * var * rate), then ResourceApplyAdam
    # (m += (g - m) * (1 - b1); v += (g*g - v) * (1 - b2); var -= m * alpha / (sqrt(v) + eps)) or, with amsgrad,
    # Keras' python ops (m = m*b1 + g*(1-b1); v = v*b2 + g*g*(1-b2); vhat = max(vhat, v); var -= alpha*m/(...)).
    on_tensors = tensor_steps(capturable)
    for i, (param, grad, m, v, step_t) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True)
    ):
        alpha: float | Tensor
        if on_tensors:  # the same factor, as a tensor
            alpha = -adam_step_sizes([step_t], lr=lr, beta1=beta1, beta2=beta2)[0]
        else:
            alpha = _keras_lr(lr, beta1, beta2, step_t.item())
        if weight_decay > 0.0:
            param.sub_(param * lr * weight_decay)
        if amsgrad:
            vhat = max_exp_avg_sqs[i]
            m.mul_(beta1).add_(grad * (1.0 - beta1))
            v.mul_(beta2).add_(grad * grad * (1.0 - beta2))
            torch.maximum(vhat, v, out=vhat)
            param.sub_(alpha * m / (vhat.sqrt() + eps))
        else:
            m.add_((grad - m) * (1.0 - beta1))
            v.add_((grad * grad - v) * (1.0 - beta2))
            param.sub_(m * alpha / (v.sqrt() + eps))


def _multi_tensor_adam_weight_decay(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    capturable: bool,
) -> None:
    # For tensors of one device and dtype.
    if weight_decay > 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    denom = torch._foreach_sqrt(max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if tensor_steps(capturable):
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(updates, adam_step_sizes(state_steps, lr=lr, beta1=beta1, beta2=beta2))
        torch._foreach_add_(params, updates)
    else:
        alphas = [-_keras_lr(lr, beta1, beta2, t) for t in torch.stack(state_steps).tolist()]
        torch._foreach_addcdiv_(params, exp_avgs, denom, alphas)


def _fused_adam_weight_decay(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    capturable: bool,
) -> None:
    # torch._fused_adamw_: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps'). With eps' = eps/sqrt(bc2)
    # that is Keras' p -= lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps), after the same decoupled decay.
    del capturable  # adam_weight_decay() sends capturable work to the multi-tensor path

    def hyperparameters(t: float) -> tuple[float, float, float]:
        return lr, eps / math.sqrt(1.0 - beta2**t), weight_decay

    fused_adamw(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        beta1=beta1, beta2=beta2, hyperparameters=hyperparameters, amsgrad=amsgrad,
    )  # fmt: skip


_IMPLEMENTATIONS = {
    "single_tensor": _single_tensor_adam_weight_decay,
    "multi_tensor": _multi_tensor_adam_weight_decay,
    "fused": _fused_adam_weight_decay,
}
