"""Matching saved parameters to live ones: names, positions, shapes, dtypes, groups; strict=False reports."""

from __future__ import annotations

import torch

import hf_optim
from hf_optim import (
    load_state,
    save_state,
)
from tests.state.helpers import (
    OPTIMIZERS,
    Net,
    assert_load_fails_unchanged,
    assert_same_value,
    batches,
    grouped,
    make_setup,
    snapshot,
    target,
    train,
)


def test_shape_mismatch_names_parameter(saved):
    assert_load_fails_unchanged(saved, target(hidden=5), r"encoder\.weight.*shape")


def test_missing_parameter_is_named(saved):
    assert_load_fails_unchanged(saved, target(extra=True), r"missing from the checkpoint: 'extra\.weight'")


def test_unexpected_parameter_is_named(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"], extra=True)
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched)
    model2, opt2, sched2 = make_setup(OPTIMIZERS["hf_adamw"])
    train(model2, opt2, sched2, batches(1, 2))
    assert_load_fails_unchanged(tmp_path, (model2, opt2, sched2, None), r"does not have: 'extra\.weight'")


def test_group_count_mismatch(saved):
    model, _opt, _sched, _acc = target()
    torch.manual_seed(0)
    opt1 = hf_optim.AdamW(Net().named_parameters(), lr=1e-2)
    assert_load_fails_unchanged(saved, (model, opt1, None, None), r"2 parameter group\(s\), the optimizer 1")


def test_dtype_mismatch(saved):
    assert_load_fails_unchanged(saved, target(dtype=torch.float64), r"encoder\.weight.*float32.*float64")


def test_optimizer_class_mismatch(saved):
    model, _opt, _sched, _acc = target()
    sgd = torch.optim.SGD(grouped(model), lr=0.1)
    assert_load_fails_unchanged(saved, (model, sgd, None, None), "saved from hf_optim.optimizers.adamw.AdamW")


def test_non_strict_loads_the_matching_part(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 3))
    saved_state = snapshot(opt)[0]
    save_state(tmp_path, opt, sched)

    # target: 'extra' is new, 'encoder' changed shape (hidden 5 -> encoder/norm/head all change), so use a
    # model whose encoder has the same shape but which has an extra layer
    model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"], extra=True)
    train(model2, opt2, sched2, batches(2, 1))
    before = snapshot(opt2)[0]
    report = load_state(tmp_path, opt2, sched2, strict=False)
    assert report.missing == ("extra.weight", "extra.bias")
    assert report.unexpected == () and report.mismatched == ()
    assert report.param_groups_restored and report.scheduler_loaded and not report.complete
    got = opt2.state_dict()
    names2 = [n for g in got["param_groups"] for n in g["param_names"]]
    names1 = [n for g in saved_state["param_groups"] for n in g["param_names"]]
    for i2, name in enumerate(names2):
        if name.startswith("extra"):
            assert_same_value(got["state"][i2], before["state"][i2], name)  # kept
        else:
            assert_same_value(got["state"][i2], saved_state["state"][names1.index(name)], name)


def test_non_strict_skips_mismatched_shapes(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"], hidden=5)
    report = load_state(tmp_path, opt2, sched2, strict=False)
    assert set(report.mismatched) == {
        "encoder.weight",
        "encoder.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
    }
    assert report.loaded == ("head.bias",) or set(report.loaded) == {"head.bias"}
    assert report.notes


def test_non_strict_skips_parameters_whose_existing_state_differs(tmp_path):
    """Same parameter shapes, but the optimizer's own state has another key / another buffer shape: keep it."""
    model, opt, sched = make_setup(OPTIMIZERS["sgd_momentum"])
    train(model, opt, sched, batches(1, 2))
    saved_state = snapshot(opt)[0]
    save_state(tmp_path, opt)
    model2, opt2, _ = make_setup(OPTIMIZERS["sgd_momentum"], scheduler=False)
    train(model2, opt2, None, batches(2, 2))
    opt2.state[model2.encoder.weight]["extra_key"] = torch.zeros(1)
    opt2.state[model2.head.weight]["momentum_buffer"] = torch.zeros(7)
    before = snapshot(opt2)[0]

    report = load_state(tmp_path, opt2, strict=False)
    assert set(report.mismatched) == {"encoder.weight", "head.weight"}
    assert not report.complete
    assert set(report.loaded) == {n for n, _ in model2.named_parameters()} - {"encoder.weight", "head.weight"}
    got = opt2.state_dict()
    names = [n for g in got["param_groups"] for n in g["param_names"]]
    saved_names = [n for g in saved_state["param_groups"] for n in g["param_names"]]
    for i, name in enumerate(names):
        expected = before if name in ("encoder.weight", "head.weight") else saved_state
        j = i if expected is before else saved_names.index(name)
        assert_same_value(got["state"][i], expected["state"][j], name)

    assert_load_fails_unchanged(
        tmp_path,
        (model2, opt2, None, None),
        r"(?s)'encoder\.weight' has keys.*'head\.weight' has shape \(3, 8\) in the checkpoint but \(7,\)",
    )
