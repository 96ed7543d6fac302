"""hf_optim._utils: parameters_of and the shared number checks (values written out)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_optim._utils import finite_number, non_negative_int, parameters_of


def test_parameters_of_accepts_what_torch_optimizers_accept():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    expected = [model[0].weight, model[0].bias, model[1].weight, model[1].bias]
    for given in (
        model,
        list(model.parameters()),
        list(model.named_parameters()),
        [{"params": [model[0].weight, model[0].bias]}, {"params": list(model[1].named_parameters())}],
    ):
        assert [id(p) for p in parameters_of(given)] == [id(p) for p in expected]
    with pytest.raises(ValueError, match="single Tensor"):
        parameters_of(torch.zeros(2))
    with pytest.raises(ValueError, match="params_or_model must hold"):
        parameters_of([3])


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0), (7, 7), (3.0, 3), (torch.tensor(5), 5), (None, None)]
)
def test_non_negative_int(value, expected):
    assert non_negative_int(value, "steps", optional=True) == expected


@pytest.mark.parametrize("value", [-1, 1.5, math.nan, math.inf, True, "3", torch.zeros(2), None])
def test_non_negative_int_rejects_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^steps"):
        non_negative_int(value, "steps")
    with pytest.raises(ValueError, match="positive"):
        non_negative_int(0, "steps", positive=True)


def test_finite_number():
    assert finite_number(2, "x") == 2 and type(finite_number(2, "x")) is int
    assert finite_number(-0.5, "x") == -0.5
    assert finite_number(None, "x", optional=True) is None
    assert finite_number(0, "x", minimum=0) == 0
    for value, kwargs in (
        (math.nan, {}),
        (math.inf, {}),
        (False, {}),
        ("1", {}),
        (0, {"minimum": 0, "strict": True}),
    ):
        with pytest.raises(ValueError, match=r"^x "):
            finite_number(value, "x", **kwargs)
