"""transformers' own optimizer names in hf_optim's registry (hf_optim.integrations.transformers.provider).

Reference: what transformers' ``Trainer.create_optimizer`` builds for the same ``TrainingArguments``.
"""

from __future__ import annotations

import pytest
import torch

import hf_optim
from hf_optim.integrations.transformers import registered_names

transformers = pytest.importorskip("transformers")
from transformers import Trainer as HFTrainer  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

from tests.integrations.transformers_helpers import HF_OPTIM_NAMES, tiny_bert, training_args  # noqa: E402

HYPER = {
    "learning_rate": 3e-4,
    "weight_decay": 0.05,
    "adam_beta1": 0.8,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-7,
}


def trainer_optimizer(tmp_path, model, optim: str, **kwargs) -> torch.optim.Optimizer:
    args = training_args(tmp_path, optim=optim, **HYPER, **kwargs)
    return HFTrainer(model=model, args=args).create_optimizer()


def without_params(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def assert_same_optimizer(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    assert type(ours) is type(theirs)
    assert ours.defaults == theirs.defaults
    assert len(ours.param_groups) == len(theirs.param_groups)
    for mine, reference in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert without_params(mine) == without_params(reference)
        assert [id(p) for p in mine["params"]] == [id(p) for p in reference["params"]]


@pytest.mark.parametrize(
    ("optim", "optim_args", "ours"),
    [
        ("adamw_torch", None, {}),
        ("adamw_torch_fused", None, {}),
        ("adafactor", None, {}),
        ("sgd", "momentum=0.9,nesterov=true", {"optim_args": "momentum=0.9,nesterov=true"}),
        ("sgd", "momentum=0.9,nesterov=true", {"momentum": 0.9, "nesterov": True}),
        ("adagrad", "lr_decay=0.01", {"optim_args": {"lr_decay": 0.01}}),
        ("rmsprop", "alpha=0.9,centered=true", {"optim_args": "alpha=0.9,centered=true"}),
    ],
)
def test_create_optimizer_builds_what_trainer_builds(tmp_path, optim, optim_args, ours):
    model = tiny_bert()
    theirs = trainer_optimizer(tmp_path, model, optim, **({"optim_args": optim_args} if optim_args else {}))
    built = hf_optim.create_optimizer(
        optim,
        model,
        lr=HYPER["learning_rate"],
        weight_decay=HYPER["weight_decay"],
        betas=(HYPER["adam_beta1"], HYPER["adam_beta2"]),
        eps=HYPER["adam_epsilon"],
        **ours,
    )
    assert_same_optimizer(built, theirs)
    assert built.hf_optim_name == optim
    assert hf_optim.optimizer_name(built) == optim


def test_flat_parameters_get_the_weight_decay():
    model = torch.nn.Linear(3, 2)
    optimizer = hf_optim.create_optimizer("adamw_torch", model.parameters(), lr=0.1, weight_decay=0.3)
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.3 and group["lr"] == 0.1


def test_listing_marks_the_source():
    ours = hf_optim.list_optimizers(source="hf_optim")
    theirs = hf_optim.list_optimizers(source="transformers")
    added = set(registered_names()["optimizers"])  # hf_optim's two, and names earlier tests registered
    assert set(HF_OPTIM_NAMES) <= added and added.isdisjoint({"adamw_torch", "sgd", "adafactor"})
    expected = sorted(k.value for k in _OPTIMIZER_HANDLERS if k.value not in added)
    assert theirs == expected
    assert {"adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "adafactor"} <= set(theirs)
    assert set(ours) == set(HF_OPTIM_NAMES)
    assert hf_optim.list_optimizers() == sorted(set(ours) | set(theirs))
    assert hf_optim.list_optimizers("adamw_torch*") == [n for n in theirs if n.startswith("adamw_torch")]
    assert hf_optim.get_optimizer_info("sgd").source == "transformers"
    assert hf_optim.get_optimizer_info("adamw_hf").source == "hf_optim"


def test_an_own_entry_wins_over_transformers():
    hf_optim.register_optimizer("sgd", torch.optim.Adam, description="not transformers' sgd")
    info = hf_optim.get_optimizer_info("sgd")
    assert info.source == "hf_optim" and info.factory is torch.optim.Adam
    assert hf_optim.list_optimizers().count("sgd") == 1


def test_optimizers_built_from_the_model_point_to_trainer(monkeypatch):
    # transformers' factory protocol (Muon, Dion): the handler returns a factory that needs the model
    monkeypatch.setitem(_OPTIMIZER_HANDLERS, OptimizerNames.LOMO, lambda ctx: (lambda: None, {}))
    with pytest.raises(ValueError, match=r"'lomo' is built from the model by Trainer"):
        hf_optim.create_optimizer("lomo", tiny_bert())
