"""Checkpoints written by the serialization code this package replaced (``fixtures/``, made by
``fixtures/make_fixtures.py`` from the old code) load, and training continues exactly as the original
uninterrupted run did (its weights, first moment and learning rates after 3 more steps are in
``expected.safetensors``, also written by the old code)."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import hf_optim
from hf_optim.state import inspect_state, load_state, load_state_dict
from tests.state.fixtures.make_fixtures import finish, setup

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("folder", ["single", "sharded"])
def test_v1_fixture_loads_and_continues_like_the_original_run(folder):
    directory = os.path.join(FIXTURES, folder)
    model, opt, sched, acc = setup()
    model.load_state_dict(safetensors.torch.load_file(os.path.join(directory, "model.safetensors")))
    report = load_state(directory, opt, sched, acc)
    assert report.complete and report.scheduler_loaded and report.accumulator_loaded
    assert sched.last_epoch == 3 and acc.step == 1
    finish(model, opt, sched, acc)
    expected = safetensors.torch.load_file(os.path.join(directory, "expected.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[f"model.{name}"]), name
    first = opt.param_groups[0]["params"][0]
    assert torch.equal(opt.state[first]["exp_avg"], expected["exp_avg.0"])
    assert torch.equal(torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64), expected["lr"])


def test_v1_fixtures_agree_with_each_other_and_with_load_state_dict():
    single = load_state_dict(os.path.join(FIXTURES, "single"))
    sharded = load_state_dict(os.path.join(FIXTURES, "sharded"))
    assert single["param_groups"] == sharded["param_groups"]
    assert single["state"].keys() == sharded["state"].keys()
    for index, state in single["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sharded["state"][index][key])
    # the same numbering and names a live optimizer of that setup has
    _, opt, _, _ = setup()
    live = opt.state_dict()
    assert [g["params"] for g in single["param_groups"]] == [g["params"] for g in live["param_groups"]]
    assert [g["param_names"] for g in single["param_groups"]] == [
        g["param_names"] for g in live["param_groups"]
    ]
    info = inspect_state(os.path.join(FIXTURES, "sharded"))
    assert info.optimizer_class == "hf_optim.optimizers.adamw.AdamW" and info.scheduler_name == "cosine"
    assert len([f for f in info.files if "-of-" in f]) == 2
    assert hf_optim.has_state(os.path.join(FIXTURES, "single"))
