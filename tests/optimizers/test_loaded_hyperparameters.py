"""Hyperparameters read from a checkpoint meet the bounds of the optimizers' constructors.

Each row saves a checkpoint whose param group holds a value the constructor refuses (written by setting it on a
live optimizer, as a crafted file would hold it), then loads it into a fresh optimizer: the load must fail with a
``CheckpointError`` and leave the live optimizer exactly as it was.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_optim
from hf_optim.schedules.pretrained_bert import WarmupCosineWithHardRestartsSchedule, WarmupLinearSchedule


def _schedule_with(cls, **fields):
    schedule = (
        cls(warmup=0.1, t_total=10) if cls is WarmupLinearSchedule else cls(warmup=0.1, t_total=10, cycles=2)
    )
    schedule.__dict__.update(fields)  # a file can hold any numbers: bypass the constructor on the saving side
    return schedule


def _bert(params):
    return hf_optim.BertAdam(params, lr=1e-2, warmup=0.1, t_total=10)


def _openai(params):
    return hf_optim.OpenAIAdam(params, lr=1e-2, warmup=0.1, t_total=10)


def _adamw(params):
    return hf_optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _keras(params):
    return hf_optim.AdamWeightDecay(params, learning_rate=1e-3, weight_decay_rate=0.01)


ATTACKS = {
    # the schedule of a legacy Adam must be a schedule object; a name or null would break step()
    "bert-schedule-name": (_bert, {"schedule": "warmup_linear"}),
    "bert-schedule-none-name": (_bert, {"schedule": "none"}),
    "bert-schedule-null": (_bert, {"schedule": None}),
    "openai-schedule-name": (_openai, {"schedule": "warmup_linear"}),
    # schedules rebuilt from JSON go through the constructors' checks
    "bert-t-total-zero": (_bert, {"schedule": _schedule_with(WarmupLinearSchedule, t_total=0.0)}),
    "bert-cycles-below-one": (
        _bert,
        {"schedule": _schedule_with(WarmupCosineWithHardRestartsSchedule, cycles=0.5)},
    ),
    "openai-warmup-whole-training": (_openai, {"schedule": _schedule_with(WarmupLinearSchedule, warmup=1.0)}),
    # decay that leaves the parameters non-finite, and clipping turned off by NaN
    "bert-weight-decay-inf": (_bert, {"weight_decay": math.inf}),
    "bert-weight-decay-huge": (_bert, {"weight_decay": 1e300}),
    "bert-max-grad-norm-nan": (_bert, {"max_grad_norm": math.nan}),
    "openai-max-grad-norm-nan": (_openai, {"max_grad_norm": math.nan}),
    "adamw-weight-decay-1e308": (_adamw, {"weight_decay": 1e308}),
    "adamw-decay-factor-negative": (_adamw, {"lr": 0.5, "weight_decay": 3.0}),
    "keras-weight-decay-1e308": (_keras, {"weight_decay": 1e308}),
}


def _trained(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


@pytest.mark.parametrize(("make", "hostile"), ATTACKS.values(), ids=ATTACKS.keys())
def test_a_value_the_constructor_refuses_is_refused_at_load(tmp_path, make, hostile):
    _, saving = _trained(make)
    saving.param_groups[0].update(hostile)
    hf_optim.save_state(tmp_path, saving)

    _, live = _trained(make)
    before = copy.deepcopy(live.state_dict())
    with pytest.raises(hf_optim.CheckpointError):
        hf_optim.load_state(tmp_path, live)
    after = live.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value)


@pytest.mark.parametrize("make", [_bert, _openai, _adamw, _keras])
def test_the_same_checkpoint_without_the_hostile_value_loads(tmp_path, make):
    _, saving = _trained(make)
    hf_optim.save_state(tmp_path, saving)
    _, live = _trained(make)
    hf_optim.load_state(tmp_path, live)
    assert live.param_groups[0]["lr"] == saving.param_groups[0]["lr"]


@pytest.mark.parametrize(("make", "hostile"), ATTACKS.values(), ids=ATTACKS.keys())
def test_torch_load_state_dict_refuses_it_too(make, hostile):
    _, saving = _trained(make)
    state = saving.state_dict()
    state["param_groups"][0].update(hostile)
    _, live = _trained(make)
    before = copy.deepcopy(live.param_groups[0])
    with pytest.raises((TypeError, ValueError)):
        live.load_state_dict(state)
    assert {k: v for k, v in live.param_groups[0].items() if k != "params"} == {
        k: v for k, v in before.items() if k != "params"
    }
