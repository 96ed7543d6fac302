"""Train the legacy optimizers (the real pytorch-pretrained-bert modules) and hf_optim's side by side.

Both get copies of the same parameters and the same gradient stream; after each step the (clipped, in place)
gradients are recorded, so the clipping is compared too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

import hf_optim.legacy.pytorch_pretrained_bert as ours
from tests.legacy.oracles.pytorch_pretrained_bert import optimization as legacy_bert
from tests.legacy.oracles.pytorch_pretrained_bert import optimization_openai as legacy_openai

LEGACY = ModuleType(
    "legacy"
)  # the oracle's names in one namespace, like hf_optim.legacy.pytorch_pretrained_bert
LEGACY.__dict__.update({k: v for k, v in vars(legacy_bert).items() if not k.startswith("__")})
LEGACY.OpenAIAdam = legacy_openai.OpenAIAdam

SHAPES = [(17, 9), (9,), (4, 3, 5), (1,)]
IMPLS = {
    "reference": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "default": {"foreach": None, "fused": None},
}

# kwargs for the optimizer, given the namespace (oracle or hf_optim) so that schedule objects come from it
Config = Callable[[ModuleType], dict[str, Any]]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def groups(params: list[torch.Tensor], layout: str, ns: ModuleType) -> list[Any]:
    if layout == "flat":
        return params
    if layout == "named":
        return [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    # two groups: the second with its own lr, no decay, its own clipping and schedule
    return [
        {"params": params[:2]},
        {
            "params": params[2:],
            "lr": 3e-3,
            "weight_decay": 0.0,
            "max_grad_norm": 0.5,
            "schedule": ns.WarmupCosineSchedule(warmup=0.2, t_total=12),
        },
    ]


def train(
    cls: type,
    ns: ModuleType,
    config: Config,
    *,
    layout: str = "flat",
    steps: int = 15,
    extra: dict[str, Any] | None = None,
    skip: Callable[[int, int], bool] | None = None,
    grad_scale: float = 3.0,
) -> tuple[list[torch.Tensor], torch.optim.Optimizer, list[list[torch.Tensor | None]]]:
    """Train ``cls`` for ``steps``; returns final parameters, the optimizer and each step's clipped gradients."""
    params = make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oracle's add_(Number, Tensor) deprecation
        opt = cls(groups(params, layout, ns), **config(ns), **(extra or {}))
        g = torch.Generator().manual_seed(1)
        seen = []
        for step in range(steps):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g) * grad_scale
                p.grad = None if skip and skip(step, i) else grad
            opt.step()
            seen.append([None if p.grad is None else p.grad.clone() for p in params])
    return [p.detach().clone() for p in params], opt, seen


def ours_for(name: str) -> type:
    return getattr(ours, name)
