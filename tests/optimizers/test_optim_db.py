"""One table of optimizers run through the checks every hf_optim optimizer must pass (like torch's ``optim_db``).

Each row of ``OPTIM_DB`` is one optimizer: its class, a few configurations, its bad arguments and its
implementation flags. Every configuration x implementation (reference / foreach / default) x dtype goes through
the same checks: the fast paths agree with the reference path, a ``state_dict`` round trip continues identically,
``None`` gradients are skipped, sparse gradients are refused; per optimizer: bad hyperparameters, an empty
parameter list. Adding an optimizer is adding a row. The math itself is checked against independent oracles in
the per-optimizer test files (the verbatim transformers 4.x AdamW, TensorFlow's formulas).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from hf_optim import AdamW, AdamWeightDecay, BertAdam, OpenAIAdam

IMPLS = {"reference": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "default": {}}
# bias corrections on the step tensors (what torch.compile runs), for the optimizers that take ``capturable``
WITH_CAPTURABLE = {**IMPLS, "capturable": {"capturable": True}}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# fast path vs reference after STEPS steps (the reparametrised fused kernel and bf16 rounding differ slightly)
PARITY_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}
STEPS = 8


@dataclass(frozen=True)
class OptimInfo:
    """A row: the optimizer, named configurations (constructor kwargs), and arguments it must refuse."""

    cls: Callable[..., torch.optim.Optimizer]
    configs: dict[str, dict[str, Any]]
    bad_arguments: list[tuple[dict[str, Any], type[Exception], str]]
    impls: dict[str, dict[str, Any]] = field(default_factory=lambda: IMPLS)
    dtypes: tuple[torch.dtype, ...] = DTYPES
    sparse_error: str = r"sparse gradients \(parameter weight\)"  # what step() says about a sparse gradient


OPTIM_DB = [
    OptimInfo(
        AdamW,
        configs={
            "plain": {"lr": 1e-2},
            "decay": {"lr": 1e-2, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-4},
            "no_bias_correction": {"lr": 1e-2, "weight_decay": 0.05, "correct_bias": False},
        },
        bad_arguments=[
            ({"lr": -1e-3}, ValueError, r"lr must be finite and in \[0.0, inf\)"),
            ({"lr": float("nan")}, ValueError, "lr must be finite"),
            ({"lr": "1e-3"}, TypeError, "lr must be a real number"),
            ({"betas": 0.9}, TypeError, "betas must be a pair"),
            ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be finite and in \[0.0, 1.0\)"),
            ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
            ({"betas": (0.9,)}, ValueError, "betas must be a pair"),
            ({"eps": -1e-8}, ValueError, "eps must be finite"),
            ({"weight_decay": -0.1}, ValueError, "weight_decay must be finite"),
            ({"weight_decay": float("inf")}, ValueError, "weight_decay must be finite"),
            ({"foreach": True, "fused": True}, ValueError, "foreach and fused cannot both be True"),
            ({"amsgrad": True}, ValueError, "amsgrad=True would change the algorithm"),
            ({"maximize": True}, ValueError, "maximize=True would change the algorithm"),
            ({"differentiable": True}, ValueError, "differentiable=True would change the algorithm"),
            ({"capturable": "yes"}, TypeError, "capturable must be a bool"),
            # a decay factor 1 - lr*wd below 0 flips the parameters; 1e308 makes them infinite in one step
            ({"lr": 1e-3, "weight_decay": 1e308}, ValueError, r"lr \* weight_decay must be <= 1"),
            ({"lr": 0.5, "weight_decay": 2.5}, ValueError, r"lr \* weight_decay must be <= 1"),
        ],
        impls=WITH_CAPTURABLE,
    ),
    OptimInfo(
        AdamWeightDecay,
        configs={
            "plain": {"learning_rate": 1e-2},
            "decay_by_name": {
                "learning_rate": 1e-2,
                "weight_decay_rate": 0.1,
                "exclude_from_weight_decay": ["bias"],
                "beta_1": 0.8,
                "epsilon": 1e-4,
            },
            "amsgrad_clipped": {
                "learning_rate": 1e-2,
                "amsgrad": True,
                "global_clipnorm": 1.0,
                "clipvalue": 0.5,
            },
            "clipnorm": {"learning_rate": 1e-2, "clipnorm": 0.5, "weight_decay_rate": 0.01},
        },
        bad_arguments=[
            ({"learning_rate": -1.0}, ValueError, r"learning_rate must be finite and in \[0.0, inf\)"),
            ({"beta_1": 1.0}, ValueError, r"beta_1 must be finite and in \[0.0, 1.0\)"),
            ({"beta_2": float("nan")}, ValueError, "beta_2 must be finite"),
            ({"epsilon": -1.0}, ValueError, "epsilon must be finite"),
            ({"weight_decay_rate": -0.1}, ValueError, "weight_decay_rate must be finite"),
            (
                {"clipnorm": 1.0, "global_clipnorm": 1.0},
                ValueError,
                "clipnorm and global_clipnorm cannot both",
            ),
            ({"clipvalue": -1.0}, ValueError, "clipvalue must be finite"),
            ({"exclude_from_weight_decay": ["bias("]}, ValueError, r"invalid regex 'bias\('"),
            ({"include_in_weight_decay": [3]}, TypeError, "must be a list of regex strings"),
            ({"foreach": True, "fused": True}, ValueError, "foreach and fused cannot both be True"),
            ({"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
            (
                {"learning_rate": 1e-3, "weight_decay_rate": 1e308},
                ValueError,
                r"lr \* weight_decay must be <= 1",
            ),
        ],
        impls=WITH_CAPTURABLE,
    ),
    OptimInfo(
        functools.partial(BertAdam, lr=1e-2),  # lr has no default
        configs={
            "defaults": {"warmup": 0.1, "t_total": 6},  # clipping, decay, past t_total
            "no_clip_cosine": {
                "schedule": "warmup_cosine",
                "warmup": 0.2,
                "t_total": 20,
                "max_grad_norm": -1,
            },
            "constant_no_decay": {"schedule": None, "weight_decay": 0.0, "b1": 0.8, "e": 1e-4},
        },
        bad_arguments=[
            ({"lr": -1.0}, ValueError, r"lr must be finite and in \[0.0, inf\)"),
            ({"b1": 1.0}, ValueError, r"b1 must be finite and in \[0.0, 1.0\)"),
            ({"b1": -0.1}, ValueError, r"b1 must be finite and in \[0.0, 1.0\)"),
            ({"b2": float("nan")}, ValueError, "b2 must be finite"),
            ({"b2": 1.0}, ValueError, r"b2 must be finite and in \[0.0, 1.0\)"),
            ({"e": -1e-6}, ValueError, "e must be finite"),
            ({"warmup": 1.5, "t_total": 10}, ValueError, "Invalid warmup"),
            ({"schedule": "warmup_linaer"}, ValueError, "Did you mean 'warmup_linear'"),
            ({"foreach": True, "fused": True}, ValueError, "foreach and fused cannot both be True"),
            ({"weight_decay": float("inf")}, ValueError, "weight_decay must be finite"),
            ({"weight_decay": 1e308}, ValueError, r"lr \* weight_decay must be <= 1"),
            ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must not be NaN"),
            ({"max_grad_norm": "1"}, TypeError, "max_grad_norm must be a real number"),
            ({"warmup": 0.1, "t_total": 0}, ValueError, "t_total must not be 0"),
            ({"schedule": 3}, TypeError, "schedule must be a name, None or an LRSchedule"),
            ({"lr": "1e-3"}, TypeError, "lr must be a real number"),
        ],
    ),
    OptimInfo(
        functools.partial(OpenAIAdam, lr=1e-2),  # lr has no default
        configs={
            "defaults": {"warmup": 0.1, "t_total": 6},
            "decay_clip": {"warmup": 0.1, "t_total": 20, "weight_decay": 0.01, "max_grad_norm": 1.0},
            "vector_l2": {
                "schedule": "warmup_constant",
                "warmup": 0.2,
                "t_total": 20,
                "weight_decay": 0.1,
                "vector_l2": True,
            },
        },
        bad_arguments=[
            ({"lr": -1.0}, ValueError, r"lr must be finite and in \[0.0, inf\)"),
            ({"b1": -0.1}, ValueError, r"b1 must be finite and in \[0.0, 1.0\)"),
            ({"b1": 1.5}, ValueError, r"b1 must be finite and in \[0.0, 1.0\)"),
            ({"b2": -0.5}, ValueError, r"b2 must be finite and in \[0.0, 1.0\)"),
            ({"e": -1e-8}, ValueError, "e must be finite"),
            ({"schedule": "cosine"}, ValueError, "Invalid schedule parameter"),
            ({"schedule": "warmup_cosin"}, ValueError, "Did you mean 'warmup_cosine'"),
            ({"foreach": True, "fused": True}, ValueError, "foreach and fused cannot both be True"),
            ({"weight_decay": float("inf")}, ValueError, "weight_decay must be finite"),
            ({"weight_decay": 200.0}, ValueError, r"lr \* weight_decay must be <= 1"),
            ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must not be NaN"),
        ],
    ),
]

NAMES = ["encoder.weight", "encoder.bias", "head.weight"]
SHAPES = [(5, 4), (4,), (3, 2, 2)]


def _id(info: OptimInfo) -> str:
    cls = getattr(info.cls, "func", info.cls)  # a functools.partial names its class
    return getattr(cls, "__name__", str(cls))


CASES = [
    pytest.param(
        info, config, impl, dtype, id=f"{_id(info)}-{config}-{impl}-{str(dtype).removeprefix('torch.')}"
    )
    for info in OPTIM_DB
    for config in info.configs
    for impl in info.impls
    for dtype in info.dtypes
]


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def grad_stream(dtype: torch.dtype, steps: int = STEPS) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)
    ]


def build(info: OptimInfo, config: str, impl: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return info.cls(list(zip(NAMES, params, strict=True)), **info.configs[config], **info.impls[impl])


def train(opt, params, stream, skip: Callable[[int, int], bool] | None = None) -> None:
    for t, grads in enumerate(stream):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if skip and skip(t, i) else g.clone()
        opt.step()


@pytest.mark.parametrize(("info", "config", "impl", "dtype"), CASES)
def test_implementation_agrees_with_the_reference_path(info, config, impl, dtype):
    reference, params = make_params(dtype), make_params(dtype)
    stream = grad_stream(dtype)
    train(build(info, config, "reference", reference), reference, stream)
    train(build(info, config, impl, params), params, stream)
    tol = PARITY_TOL[dtype]
    for r, p, p0 in zip(reference, params, make_params(dtype), strict=True):
        assert p.dtype == dtype
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p.detach(), r.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("info", "config", "impl", "dtype"), CASES)
def test_state_dict_round_trip_continues_identically(info, config, impl, dtype):
    stream = grad_stream(dtype)
    full = make_params(dtype)
    train(build(info, config, impl, full), full, stream)

    params = make_params(dtype)
    opt = build(info, config, impl, params)
    train(opt, params, stream[: STEPS // 2])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = build(info, config, impl, resumed)
    opt2.load_state_dict(saved)
    train(opt2, resumed, stream[STEPS // 2 :])
    for f, r in zip(full, resumed, strict=True):
        assert torch.equal(f, r)


@pytest.mark.parametrize(("info", "config", "impl", "dtype"), CASES)
def test_none_gradients_are_skipped(info, config, impl, dtype):
    params = make_params(dtype)
    opt = build(info, config, impl, params)
    train(opt, params, grad_stream(dtype), skip=lambda t, i: i == 1)  # the bias never gets a gradient
    before = make_params(dtype)
    assert torch.equal(params[1], before[1])
    assert params[1] not in opt.state
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[2], before[2])


@pytest.mark.parametrize(
    ("info", "config", "impl"), [c.values[:3] for c in CASES if c.values[3] is torch.float32]
)
def test_sparse_gradients_are_refused(info, config, impl):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = info.cls(emb.named_parameters(), **info.configs[config], **info.impls[impl])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=info.sparse_error):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert not opt.state


@pytest.mark.parametrize(
    ("info", "kwargs", "error", "message"),
    [pytest.param(info, *bad, id=f"{_id(info)}-{bad[0]}") for info in OPTIM_DB for bad in info.bad_arguments],
)
def test_bad_hyperparameters_are_refused(info, kwargs, error, message):
    with pytest.raises(error, match=message):
        info.cls(list(zip(NAMES, make_params(torch.float32), strict=True)), **kwargs)


@pytest.mark.parametrize("info", OPTIM_DB, ids=_id)
def test_empty_parameter_list_is_refused(info):
    with pytest.raises(ValueError, match="empty parameter list"):
        info.cls([])
