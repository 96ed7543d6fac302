"""Fixtures of the state tests."""

from __future__ import annotations

import pytest

import hf_optim
from hf_optim import save_state
from tests.state.helpers import OPTIMIZERS, batches, make_setup, train


@pytest.fixture
def saved(tmp_path):
    """A checkpoint (optimizer + scheduler + accumulator, named params) and a trained target to load into."""
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, batches(8, 5), acc, micro=2)
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"
