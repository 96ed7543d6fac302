"""Value trees <-> JSON + tensors: exotic Python values keep their types, tags vs names, registered types."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import (
    OPTIMIZER_NAME,
    has_state,
    load_state,
    save_state,
)
from tests.state.helpers import (
    Net,
    OddState,
    TensorKeyed,
    assert_same_value,
    batches,
    snapshot,
)


def test_exotic_values_round_trip_with_their_python_types(tmp_path):
    model = Net(dtype=torch.bfloat16)

    def named(module):
        return [(f"{module}.{n}", p) for n, p in getattr(model, module).named_parameters()]

    groups = [
        {
            "params": named("encoder"),
            "lr": torch.tensor(0.25),
            "betas": (0.9, 0.99),
            "weird": [
                float("nan"),
                float("inf"),
                -float("inf"),
                0.1 + 0.2,
                1e-300,
                5e-324,
                None,
                "s",
                True,
                7,
            ],
            "nested": {"a": (1, [2.0]), 3: "int key"},
        },
        {
            "params": named("head") + named("norm"),
            "lr": 0.125,
            "betas": (0.5, 0.25),
            "weird": [],
            "nested": {},
        },
    ]
    opt = OddState(groups)
    for x, y in batches(5, 2, torch.bfloat16):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    expected = snapshot(opt)[0]
    save_state(tmp_path, opt)
    opt2 = OddState(
        [
            {"params": named("encoder"), "lr": 0.0, "betas": (0.0, 0.0), "weird": None, "nested": None},
            {
                "params": named("head") + named("norm"),
                "lr": 0.0,
                "betas": (0.0, 0.0),
                "weird": None,
                "nested": None,
            },
        ]
    )
    load_state(tmp_path, opt2)
    got = opt2.state_dict()
    assert_same_value(got, expected, "odd")
    # the float32 buffers of bfloat16 parameters keep float32 (torch alone would cast them to bfloat16)
    assert all(s["buf32"].dtype == torch.float32 for s in got["state"].values())
    assert isinstance(got["state"][0]["count"], int) and isinstance(got["state"][0]["scale"], float)


def test_parameter_state_key_and_hyperparameter_named_tensor_round_trip(tmp_path):
    """'tensor' is also the tag of a tensor reference in the metadata: as a name it must not be taken for one."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tensor = torch.nn.Parameter(torch.randn(3))
            self.other = torch.nn.Parameter(torch.randn(2))

    def optimizers(model):
        named = dict(model.named_parameters())
        groups = [
            {"params": [("tensor", named["tensor"])], "tensor": 0.25},
            {"params": [("other", named["other"])], "tensor": torch.tensor([2.0, 3.0])},
        ]
        return [
            TensorKeyed(groups),
            torch.optim.AdamW([{**g, "tensor": 0.5} for g in groups], lr=0.1),
        ]

    torch.manual_seed(0)
    model = Model()
    for i, opt in enumerate(optimizers(model)):
        model.tensor.grad = torch.ones(3)
        model.other.grad = torch.ones(2)
        opt.step()
        expected = snapshot(opt)[0]
        save_state(tmp_path / str(i), opt)
        assert has_state(tmp_path / str(i))
        with safe_open(str(tmp_path / str(i) / OPTIMIZER_NAME), framework="pt") as f:
            assert "state.tensor." + ("tensor" if i == 0 else "exp_avg") in set(f.keys())
        fresh = optimizers(model)[i]
        load_state(tmp_path / str(i), fresh)
        assert_same_value(fresh.state_dict(), expected, type(opt).__name__)
        assert hf_optim.inspect_state(tmp_path / str(i)).param_groups[0]["hyperparameters"]["tensor"] == (
            0.25 if i == 0 else 0.5
        )


def test_unsupported_state_value_names_parameter_and_key(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    opt.state[model.head.weight]["callback"] = object()
    with pytest.raises(ValueError, match=r"head\.weight.*'callback'"):
        save_state(tmp_path, opt)
    assert not os.path.exists(tmp_path / OPTIMIZER_NAME)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
