"""What ``convert_checkpoint`` infers, against the state dicts of the real optimizer classes."""

from __future__ import annotations

import pytest
import torch

import hf_optim
from hf_optim.state.convert import infer_optimizer_class


def _state_dict(opt_cls, **kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    opt = opt_cls([p], **kwargs)
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _state_dict(torch.optim.AdamW, lr=0.1), "torch.optim.adamw.AdamW"),
        (lambda: _state_dict(torch.optim.Adam, lr=0.1), "torch.optim.adam.Adam"),
        (lambda: _state_dict(hf_optim.AdamW, lr=0.1), "hf_optim.optimizers.adamw.AdamW"),
        (lambda: _state_dict(torch.optim.SGD, lr=0.1, momentum=0.9), "torch.optim.sgd.SGD"),
    ],
    ids=["torch-adamw", "torch-adam", "hf-adamw", "sgd"],
)
def test_infer_optimizer_class(make, expected):
    sd = make()
    cls, reason = infer_optimizer_class(sd)
    assert cls == expected, reason


def test_unknown_class_says_why():
    sd = _state_dict(torch.optim.Adagrad, lr=0.1)
    cls, reason = infer_optimizer_class(sd)
    assert cls is None and reason
