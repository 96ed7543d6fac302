"""The value checks against live objects, case by case (expected outcomes written out by hand)."""

from __future__ import annotations

import pytest
import torch

from hf_optim import CheckpointError
from hf_optim.state.checks import check_hyperparameters, check_param_state, check_same_structure


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
