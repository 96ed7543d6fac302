"""hf_optim.legacy.pytorch_transformers against the real pytorch-transformers 1.2.0 optimization module."""

import pickle

import pytest
import torch

import hf_optim
from hf_optim.legacy import pytorch_transformers as ours
from tests.legacy.oracles.pytorch_transformers import optimization as legacy

# (class name, kwargs after the optimizer): one row per schedule configuration
ROWS = [
    ("ConstantLRSchedule", {}),
    ("WarmupConstantSchedule", {"warmup_steps": 5}),
    ("WarmupConstantSchedule", {"warmup_steps": 0}),
    ("WarmupLinearSchedule", {"warmup_steps": 5, "t_total": 20}),
    ("WarmupLinearSchedule", {"warmup_steps": 0, "t_total": 7}),
    ("WarmupLinearSchedule", {"warmup_steps": 10, "t_total": 10}),
    ("WarmupCosineSchedule", {"warmup_steps": 3, "t_total": 20}),
    ("WarmupCosineSchedule", {"warmup_steps": 3, "t_total": 20, "cycles": 1.5}),
    ("WarmupCosineWithHardRestartsSchedule", {"warmup_steps": 2, "t_total": 25, "cycles": 3.0}),
    ("WarmupCosineWithHardRestartsSchedule", {"warmup_steps": 0, "t_total": 9}),
]
IDS = [f"{name}-{kw}" for name, kw in ROWS]


def optimizer(lr=0.1):
    return torch.optim.SGD([torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)], lr=lr)


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(("name", "kwargs"), ROWS, ids=IDS)
def test_every_step_equals_legacy(name, kwargs):
    expected = lrs(getattr(legacy, name)(optimizer(), **kwargs), 40)
    got = lrs(getattr(ours, name)(optimizer(), **kwargs), 40)
    assert got == expected
    new = getattr(ours, name)(optimizer(), **kwargs)
    old = getattr(legacy, name)(optimizer(), **kwargs)
    for step in range(-2, 60):
        assert new.lr_lambda(step) == old.lr_lambdas[0](step)


@pytest.mark.parametrize(("name", "kwargs"), ROWS, ids=IDS)
def test_resume_from_state_dict(name, kwargs):
    expected = lrs(getattr(legacy, name)(optimizer(), **kwargs), 30)
    first = getattr(ours, name)(optimizer(), **kwargs)
    lrs(first, 12)
    state = pickle.loads(pickle.dumps(first.state_dict()))  # plain data only
    assert state["last_epoch"] == 12
    opt = optimizer()
    resumed = getattr(ours, name)(opt, **kwargs)
    resumed.load_state_dict(state)
    for group, lr in zip(opt.param_groups, expected[12], strict=True):  # as optimizer.load_state_dict would
        group["lr"] = lr
    assert lrs(resumed, 18) == expected[12:]


def test_resume_with_last_epoch():
    expected = lrs(legacy.WarmupLinearSchedule(optimizer(), 5, 20), 20)
    opt = optimizer()
    for g in opt.param_groups:
        g["initial_lr"] = 0.1
    resumed = ours.WarmupLinearSchedule(opt, 5, 20, last_epoch=7)
    got = lrs(resumed, 12)
    assert got[1:] == expected[9:20]


def test_adamw_is_hf_optim_adamw_on_the_exact_path():
    assert issubclass(ours.AdamW, hf_optim.AdamW) and ours.AdamW.__name__ == "AdamW"
    opt = ours.AdamW([torch.zeros(2, requires_grad=True)])
    assert (opt.defaults["foreach"], opt.defaults["fused"]) == (False, False)
