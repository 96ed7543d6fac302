"""The value checks against live objects, case by case (expected outcomes written out by hand)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_optim import CheckpointError
from hf_optim.state.checks import (
    check_hyperparameters,
    check_param_state,
    check_same_structure,
    check_scheduler_state,
    expected_state_keys,
)


@pytest.mark.parametrize(
    ("saved", "live"),
    [
        (1, 2.0),
        (2.5, 1),
        (torch.tensor(0.1), 0.3),
        ((0.9, 0.99), (0.5, 0.5)),
        ([1, 2], [3, 4]),
        ({"a": [1], "b": None}, {"a": [2], "b": None}),
        ("s", "t"),
        (False, True),
    ],
)
def test_same_structure_accepts(saved, live):
    check_same_structure(saved, live, "f")


@pytest.mark.parametrize(
    ("saved", "live", "match"),
    [
        (True, 1.0, "expected a number"),
        ("1", 1.0, "expected a number"),
        (1, True, "expected a bool"),
        ([0.9, 0.99], (0.5, 0.5), "expected a tuple of length 2"),
        ((0.9,), (0.5, 0.5), "expected a tuple of length 2"),
        ([1, 2, 3], [1, 2], "expected a list of length 2"),
        ({"a": 1}, {"a": 1, "b": 2}, "expected keys"),
        (1, None, "expected None"),
        ([[1, "x"]], [[1, 2]], r"f\[0\]\[1\]: expected a number"),
    ],
)
def test_same_structure_refuses(saved, live, match):
    with pytest.raises(CheckpointError, match=match):
        check_same_structure(saved, live, "f")


def test_hyperparameters_none_means_not_set_and_bounds_apply_to_numbers_only():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    live = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    notes: list[str] = []
    saved = dict(live, lr=0.5, foreach=False)  # foreach is None (not set) in the live group
    assert check_hyperparameters(opt, 0, saved, live, "f", strict=True, notes=notes)["lr"] == 0.5

    # Adafactor-style: eps is a pair and lr may be None; no AdamW bounds apply to other types
    class Other(torch.optim.Optimizer):
        def __init__(self, params, eps=(1e-30, 1e-3), lr=None):
            super().__init__(params, {"eps": eps, "lr": lr})

    other = Other([torch.nn.Parameter(torch.zeros(2))])
    live_other = {k: v for k, v in other.param_groups[0].items() if k != "params"}
    check_hyperparameters(
        other, 0, {"eps": (1e-30, 1e-3), "lr": None}, live_other, "f", strict=True, notes=notes
    )


def test_param_state_checks():
    p = torch.zeros(3, 2)
    check_param_state("w", {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3, 2)}, p, None, "f")
    check_param_state("w", {"step": 3, "exp_avg_row": torch.zeros(3)}, p, None, "f")  # factored: free shape
    check_param_state("w", {"momentum_buffer": None}, p, None, "f")  # SGD before its first step
    for state, match in [
        ({"exp_avg": torch.zeros(2, 3)}, r"has shape \(2, 3\), the parameter \(3, 2\)"),
        ({"exp_avg_row": torch.zeros(3, dtype=torch.int64)}, "floating state only"),
        ({"step": torch.tensor(1, dtype=torch.int8)}, "step counter must be a float or int64"),
        ({"step": "1"}, "step counter must be a number"),
        ({"exp_avg_sq": [0.0]}, "must be a tensor"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check_param_state("w", state, p, None, "f")
    # a key the live state holds as a tensor must stay a tensor
    with pytest.raises(CheckpointError, match="must be a tensor"):
        check_param_state("w", {"buf": 1.0}, p, {"buf": torch.zeros(3, 2)}, "f")


@pytest.mark.parametrize("saved", [None, True, 3, 0.5, "auto"])
def test_unset_hyperparameter_takes_a_plain_scalar(saved):
    check_same_structure(saved, None, "f", none_is_unset=True)


@pytest.mark.parametrize("saved", [torch.ones(3), torch.tensor(1.0), [1], {"a": 1}, (True,)])
def test_unset_hyperparameter_refuses_tensors_and_containers(saved):
    with pytest.raises(CheckpointError, match="expected None, a bool, a number or a string"):
        check_same_structure(saved, None, "f", none_is_unset=True)


def test_param_state_checks_moments_and_steps():
    p = torch.zeros(3, 2)
    for state, match in [
        ({"exp_avg": torch.tensor(0.0)}, r"has shape \(\), the parameter \(3, 2\)"),
        ({"exp_avg": torch.zeros(3, 2, dtype=torch.complex64)}, "complex only for a complex parameter"),
        ({"step": 10**400}, "finite number"),
        ({"step": float("nan")}, "finite number"),
        ({"step": -1}, "finite number"),
        ({"step": torch.tensor([1.0, 2.0])}, "real scalar"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check_param_state("w", state, p, None, "f")
    # a complex parameter keeps complex moments
    pc = torch.zeros(3, 2, dtype=torch.complex64)
    check_param_state("w", {"exp_avg": torch.zeros(3, 2, dtype=torch.complex64)}, pc, None, "f")


def test_fresh_state_keys_must_be_the_optimizers():
    keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
    p = torch.zeros(3, 2)
    full = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 2), "exp_avg_sq": torch.zeros(3, 2)}
    check_param_state("w", full, p, None, "f", expected_keys=keys)
    for drop in keys:
        with pytest.raises(CheckpointError, match=f"missing \\['{drop}'\\]"):
            check_param_state(
                "w", {k: v for k, v in full.items() if k != drop}, p, None, "f", expected_keys=keys
            )


@pytest.mark.parametrize(
    ("make", "hyper", "expected"),
    [  # the per-parameter state torch documents for each algorithm
        (torch.optim.AdamW, {"lr": 0.1}, {"step", "exp_avg", "exp_avg_sq"}),
        (
            torch.optim.AdamW,
            {"lr": 0.1, "amsgrad": True},
            {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
        ),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"momentum_buffer"}),
    ],
)
def test_expected_state_keys_of_torch_optimizers(make, hyper, expected):
    live = make([torch.nn.Parameter(torch.zeros(3))], **hyper)
    assert expected_state_keys(live, {**live.param_groups[0], **hyper}, torch.zeros(3)) == expected
    assert not live.state  # the live optimizer is not stepped


def _scheduler_pair():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10, cycle_momentum=False)
    return sched.state_dict(), set(opt.param_groups[0])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(base_lrs=[-1.0]), "learning rate must be finite and non-negative"),
        (lambda s: s.update(_last_lr=[float("inf")]), "learning rate must be finite and non-negative"),
        (lambda s: s.update(total_steps=float("nan")), "not a number"),
        (lambda s: s.update(last_epoch=-2), "last_epoch must be an int >= -1"),
        (lambda s: s["_schedule_phases"][0].update(start_lr="lr"), "expected 'initial_lr'"),
    ],
)
def test_scheduler_state_values(change, match):
    state, group_keys = _scheduler_pair()
    live = dict(state)
    check_scheduler_state(state, live, group_keys, "f")
    saved = copy.deepcopy(state)
    change(saved)
    with pytest.raises(CheckpointError, match=match):
        check_scheduler_state(saved, live, group_keys, "f")
