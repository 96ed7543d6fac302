"""load_state: validation before any change, rollback, scheduler / accumulator handling, no pickle."""

from __future__ import annotations

import pickle

import pytest
import torch

import hf_optim
from hf_optim import (
    SCHEDULER_NAME,
    has_state,
    load_state,
    save_state,
)
from tests.state.helpers import (
    OPTIMIZERS,
    assert_load_fails_unchanged,
    batches,
    make_setup,
    target,
    train,
)


def test_no_pickle_is_used_when_loading(tmp_path, monkeypatch):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched, hf_optim.GradientAccumulator())

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["hf_adamw"])
    load_state(tmp_path, opt2, sched2, hf_optim.GradientAccumulator())


def test_has_state(tmp_path):
    assert not has_state(tmp_path)
    _model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    save_state(tmp_path, opt, sched)
    assert has_state(tmp_path)
    (tmp_path / SCHEDULER_NAME).write_text("{}")
    assert not has_state(tmp_path)


def test_scheduler_mismatch(saved):
    model, opt, _sched, acc = target()
    other = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    assert_load_fails_unchanged(
        saved, (model, opt, other, acc), "schedule 'cosine' but the scheduler is 'linear'"
    )


def test_accumulator_gradient_count_mismatch(saved):
    model, opt, sched, _acc = target()
    acc2 = hf_optim.GradientAccumulator()
    acc2([torch.ones(2)])
    assert_load_fails_unchanged(saved, (model, opt, sched, acc2), "accumulator.safetensors has 6 gradients")


def test_missing_scheduler_file_in_checkpoint(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt)
    objs = target()
    assert_load_fails_unchanged(tmp_path, objs, "no scheduler.json")


def test_failure_while_applying_rolls_back(saved, monkeypatch):
    """Even an unexpected error inside the accumulator's load_state_dict leaves optimizer and scheduler as they were."""
    objs = target()

    def boom(self, state):
        raise RuntimeError("boom")

    monkeypatch.setattr(hf_optim.GradientAccumulator, "load_state_dict", boom)
    assert_load_fails_unchanged(saved, objs, "boom", RuntimeError)


def test_non_strict_report_is_incomplete_when_the_scheduler_or_accumulator_is_skipped(saved):
    _model, opt, _sched, acc = target()
    other = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    report = load_state(saved, opt, other, acc, strict=False)
    assert report.scheduler_skipped and not report.scheduler_loaded
    assert report.accumulator_loaded and not report.accumulator_skipped
    assert not report.missing and not report.unexpected and not report.mismatched
    assert not report.complete

    _model, opt, sched, _acc = target()
    acc2 = hf_optim.GradientAccumulator()
    acc2([torch.ones(2)])
    report = load_state(saved, opt, sched, acc2, strict=False)
    assert report.accumulator_skipped and not report.accumulator_loaded
    assert report.scheduler_loaded and not report.scheduler_skipped
    assert not report.complete

    _model, opt, sched, acc = target()
    report = load_state(saved, opt, sched, acc, strict=False)
    assert report.complete and not (report.scheduler_skipped or report.accumulator_skipped)


def test_scheduler_with_other_arguments_loads_its_position_and_keeps_its_config(saved):
    _model, opt, _, acc = target()
    sched = hf_optim.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=40)
    report = load_state(saved, opt, sched, acc)
    assert any("num_training_steps" in note for note in report.notes)
    assert sched.hf_optim_config["kwargs"]["num_training_steps"] == 40
    assert sched.last_epoch == 2  # 5 micro-steps with micro=2: 2 optimizer steps


def test_report_carries_the_schedule_argument_mismatch_and_summarises(saved):
    _model, opt, _, acc = target()
    sched = hf_optim.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=40)
    report = load_state(saved, opt, sched, acc)
    assert report.scheduler_mismatch == {"num_training_steps": (20, 40)}
    text = repr(report)
    assert (
        "complete=True" in text and "loaded=6" in text and "scheduler_mismatch=['num_training_steps']" in text
    )
    assert "encoder.weight" not in text  # the full lists stay on the attributes
    assert "encoder.weight" in report.loaded


def test_local_load_state_does_not_touch_the_hub():
    from hf_optim import state

    _model, opt, sched, acc = target()
    with pytest.raises(FileNotFoundError):
        state.load_state("user/repo", opt, sched, acc)  # a repo id is just a missing local folder here


def test_serialization_is_a_deprecated_alias():
    import importlib
    import sys
    import warnings

    sys.modules.pop("hf_optim.serialization", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        serialization = importlib.import_module("hf_optim.serialization")
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    for name in serialization.__all__:
        assert getattr(serialization, name) is getattr(hf_optim, name, getattr(hf_optim.state, name))
