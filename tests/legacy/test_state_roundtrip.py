"""BertAdam / OpenAIAdam through hf_optim.save_state / load_state: schedules saved as JSON, never pickled.

The reference is an uninterrupted run: save after 6 steps, load into a fresh optimizer, continue, and the
parameters must equal those of the straight run bit for bit (reference path), the schedules (class, arguments and
warning position) restored as they were.
"""

from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.legacy import pytorch_pretrained_bert as ours
from tests.legacy.harness import IMPLS, make_params

pytest.importorskip("hf_optim.state")

CASES = {
    "bert_adam": (ours.BertAdam, {"lr": 1e-2, "warmup": 0.1, "t_total": 4}),
    "openai_adam": (ours.OpenAIAdam, {"lr": 1e-2, "warmup": 0.1, "t_total": 4, "weight_decay": 0.01}),
}


def build(cls, kwargs, params):
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    groups = [
        {"params": named[:2]},
        {
            "params": named[2:],
            "schedule": ours.WarmupCosineWithWarmupRestartsSchedule(0.1, t_total=9, cycles=2.0),
        },
    ]
    return cls(groups, **kwargs, **IMPLS["reference"])


def steps(opt, params, start, stop):
    g = torch.Generator().manual_seed(3)
    for step in range(stop):
        grads = [torch.randn(p.shape, generator=g) * 3.0 for p in params]
        if step >= start:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            opt.step()


@pytest.mark.parametrize("case", CASES)
def test_save_load_continues_exactly(tmp_path, case):
    cls, kwargs = CASES[case]
    straight_params = make_params()
    steps(build(cls, kwargs, straight_params), straight_params, 0, 12)

    params = make_params()
    opt = build(cls, kwargs, params)
    steps(opt, params, 0, 6)  # past t_total=4 in the first group: its warning position is set
    hf_optim.save_state(tmp_path, opt)
    saved_schedules = [group["schedule"] for group in opt.param_groups]
    assert saved_schedules[0].warned_for_t_total_at_progress > 1

    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".bin", ".pkl")]
    header = b"".join(p.read_bytes()[:65536] for p in tmp_path.glob("*.safetensors"))
    assert b"WarmupCosineWithWarmupRestartsSchedule" in header and b"warned_for_t_total_at_progress" in header

    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = build(cls, {**kwargs, "t_total": 1000}, resumed_params)  # other arguments: the checkpoint wins
    hf_optim.load_state(tmp_path, resumed)
    loaded = [group["schedule"] for group in resumed.param_groups]
    assert loaded == saved_schedules and [type(s) for s in loaded] == [type(s) for s in saved_schedules]
    steps(resumed, resumed_params, 6, 12)
    for s, r in zip(straight_params, resumed_params, strict=True):
        assert torch.equal(s.detach(), r.detach())


def test_tampered_schedule_is_refused_and_nothing_changes(tmp_path):
    cls, kwargs = CASES["bert_adam"]
    params = make_params()
    opt = build(cls, kwargs, params)
    steps(opt, params, 0, 3)
    hf_optim.save_state(tmp_path, opt)
    for path in Path(tmp_path).glob("*.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data.replace(b"WarmupLinearSchedule", b"XarmupLinearSchedule"))  # same length

    victim = build(cls, kwargs, make_params())
    before = [dict(group) for group in victim.param_groups]
    with pytest.raises(CheckpointError):
        hf_optim.load_state(tmp_path, victim)
    assert [dict(group) for group in victim.param_groups] == before
    assert not victim.state
