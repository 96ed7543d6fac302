"""Hostile scheduler.json: the state must have exactly the live scheduler's keys, types and list lengths, or the
load fails naming the file and changes nothing (the scheduler's whole ``__dict__`` compared)."""

from __future__ import annotations

import json

import pytest

from hf_optim import SCHEDULER_NAME, CheckpointError, save_state
from tests.state.helpers import assert_refused, trained


@pytest.fixture
def saved(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc["state_dict"]["dict"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(optimizer=None), "expected keys"),
        (lambda s: s.update(lr_lambdas="x"), "lr_lambdas"),
        (lambda s: s.pop("last_epoch"), "expected keys"),
        (lambda s: s.update(last_epoch="abc"), "last_epoch"),
        (lambda s: s.update(last_epoch=2.5), "last_epoch must be an int"),
        (lambda s: s.update(last_epoch=True), "last_epoch"),
        (lambda s: s.update(base_lrs=["a", "b"]), r"base_lrs'\]\[\d\]: expected a number"),
        (lambda s: s.update(_last_lr=[0.1]), "_last_lr'\\]: expected a list of length 2"),
        (lambda s: s.update(_last_lr={"tuple": [0.1, 0.2]}), "_last_lr'\\]: expected a list of length 2"),
        (lambda s: s.update(_step_count=None), "_step_count'\\]: expected a number"),
        (
            # hf_optim's schedule callables keep no state: nothing may be injected into their __dict__
            lambda s: s.update(lr_lambdas=[{"dict": {"func": 1}}, {"dict": {}}]),
            r"lr_lambdas'\]\[0\]: expected keys \[\], got \['func'\]",
        ),
    ],
    ids=[
        "extra-optimizer",
        "lr_lambdas-str",
        "missing-last_epoch",
        "last_epoch-str",
        "last_epoch-float",
        "last_epoch-bool",
        "base_lrs-str",
        "last_lr-short",
        "last_lr-tuple",
        "step_count-none",
        "lr_lambda-state-for-a-function",
    ],
)
def test_scheduler_state_must_match_the_live_one(saved, change, match):
    _edit(saved / SCHEDULER_NAME, change)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, match)


def test_strict_false_does_not_relax_type_checks(saved):
    _edit(saved / SCHEDULER_NAME, lambda s: s.update(last_epoch="abc"))
    assert_refused(
        saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, "last_epoch", strict=False
    )
