"""Trainer dispatch through hf_optim's handlers: TrainingArguments -> optimizer arguments, optim_args, Trainer's
decay grouping (hf_optim.integrations.transformers.handlers).

References: the legacy decay rule written out (``p <- p * (1 - lr * wd)`` for a step with zero gradients) and
BERT's parameter naming (biases and LayerNorm weights are Trainer's no-decay group)."""

from __future__ import annotations

import uuid

import pytest
import torch

import hf_optim

transformers = pytest.importorskip("transformers")
from transformers import Trainer as HFTrainer  # noqa: E402

from tests.integrations.transformers_helpers import (  # noqa: E402
    assert_decoupled_decay,
    no_decay_by_bert_naming,
    tiny_bert,
    training_args,
    zero_grad_step,
)


@pytest.mark.parametrize(
    "trainer_cls", [HFTrainer, hf_optim.Trainer], ids=["transformers.Trainer", "hf_optim.Trainer"]
)
def test_adamw_hf_gets_training_arguments_and_trainer_groups(tmp_path, trainer_cls):
    model = tiny_bert()
    args = training_args(
        tmp_path,
        optim="adamw_hf",
        learning_rate=3e-3,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        weight_decay=0.1,
        optim_args="correct_bias=False",
    )
    trainer = trainer_cls(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is hf_optim.AdamW
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-3
        assert tuple(group["betas"]) == (0.8, 0.95)
        assert group["eps"] == 1e-7
        assert group["correct_bias"] is False
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    expected_no_decay = {n for n in named if no_decay_by_bert_naming(n)}
    assert {id(p) for p in no_decay["params"]} == {id(named[n]) for n in expected_no_decay}
    assert {id(p) for p in decay["params"]} == {id(named[n]) for n in set(named) - expected_no_decay}
    if trainer_cls is hf_optim.Trainer:
        assert hf_optim.optimizer_name(optimizer) == "adamw_hf"

    # Legacy AdamW with zero gradients: the Adam term is 0, the decoupled decay gives p * (1 - lr * wd).
    before = zero_grad_step(model, optimizer)
    assert_decoupled_decay(model, before, lr=3e-3, weight_decay=0.1)


def test_adam_weight_decay_maps_to_keras_arguments(tmp_path):
    model = tiny_bert()
    args = training_args(
        tmp_path,
        optim="adam_weight_decay",
        learning_rate=2e-3,
        adam_beta1=0.85,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        weight_decay=0.2,
        optim_args="amsgrad=true,clipnorm=1.5",
    )
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is hf_optim.AdamWeightDecay
    for group in optimizer.param_groups:
        assert group["lr"] == 2e-3
        assert tuple(group["betas"]) == (0.85, 0.98)
        assert group["eps"] == 1e-6
        assert group["amsgrad"] is True
    assert optimizer.clipnorm == 1.5
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]


def test_adam_weight_decay_keras_patterns_from_optim_args(tmp_path):
    """With exclude_from_weight_decay in optim_args the Keras name rule decides (one group of named params)."""
    model = tiny_bert()
    args = training_args(
        tmp_path,
        optim="adam_weight_decay",
        learning_rate=1e-2,
        weight_decay=0.5,
        optim_args="exclude_from_weight_decay=LayerNorm|bias;classifier",
    )
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    assert optimizer.exclude_from_weight_decay == ["LayerNorm|bias", "classifier"]
    (group,) = optimizer.param_groups
    assert sorted(group["param_names"]) == sorted(n for n, _ in model.named_parameters())

    def excluded(name: str) -> bool:
        return "LayerNorm" in name or "bias" in name or "classifier" in name

    before = zero_grad_step(model, optimizer)
    assert any(excluded(n) for n in before) and not all(excluded(n) for n in before)
    assert_decoupled_decay(model, before, lr=1e-2, weight_decay=0.5, excluded=excluded)


def test_function_factory_gets_trainer_grouping(tmp_path):
    """A registered factory *function* goes through transformers' factory protocol; groups follow Trainer's rule."""
    name = f"test_factory_{uuid.uuid4().hex[:8]}"

    def sgd_factory(params, lr=1e-3, weight_decay=0.0, momentum=0.0):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)

    hf_optim.register_optimizer(name, sgd_factory)
    model = tiny_bert()
    args = training_args(tmp_path, optim=name, learning_rate=0.2, weight_decay=0.3, optim_args="momentum=0.5")
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert hf_optim.optimizer_name(optimizer) == name
    named = dict(model.named_parameters())
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert by_decay == {
        0.3: {id(p) for n, p in named.items() if not no_decay_by_bert_naming(n)},
        0.0: {id(p) for n, p in named.items() if no_decay_by_bert_naming(n)},
    }
    assert all(g["lr"] == 0.2 and g["momentum"] == 0.5 for g in optimizer.param_groups)


class _NoSignature:
    """A factory inspect.signature cannot read (like some builtins)."""

    __signature__ = "not a signature"

    def __call__(self, params, **kwargs):
        return torch.optim.SGD(params, **kwargs)


@pytest.mark.parametrize(
    "factory",
    [lambda params, **kw: torch.optim.SGD(params, **kw), _NoSignature()],
    ids=["kwargs", "no-signature"],
)
def test_factory_without_declared_arguments_gets_learning_rate_and_weight_decay(tmp_path, factory):
    name = f"test_sgd_kw_{uuid.uuid4().hex[:8]}"
    hf_optim.register_optimizer(name, factory)
    model = tiny_bert()
    args = training_args(tmp_path, optim=name, learning_rate=0.5, weight_decay=0.1)
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]
    # SGD with zero gradients: p <- p - lr * wd * p in the decay group, unchanged in the no-decay group.
    before = zero_grad_step(model, optimizer)
    assert_decoupled_decay(model, before, lr=0.5, weight_decay=0.1)


def _sgd_factory(params, lr=1e-3, weight_decay=0.0):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize(
    ("optim", "optim_args"),
    [
        ("adamw_hf", "weight_decay=0.2"),
        ("adam_weight_decay", "weight_decay_rate=0.2"),
        ("adam_weight_decay", "weight_decay=0.2"),
        ("function-factory", "weight_decay=0.2"),
    ],
)
def test_weight_decay_in_optim_args_beats_training_arguments(tmp_path, optim, optim_args):
    """optim_args > TrainingArguments: the decay group gets optim_args' rate, the no-decay group keeps 0."""
    if optim == "function-factory":
        optim = f"test_factory_{uuid.uuid4().hex[:8]}"
        hf_optim.register_optimizer(optim, _sgd_factory)
    model = tiny_bert()
    args = training_args(tmp_path, optim=optim, learning_rate=1e-2, weight_decay=0.5, optim_args=optim_args)
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    before = zero_grad_step(model, optimizer)
    assert_decoupled_decay(model, before, lr=1e-2, weight_decay=0.2)


def test_weight_decay_rate_in_optim_args_with_keras_patterns(tmp_path):
    model = tiny_bert()
    args = training_args(
        tmp_path,
        optim="adam_weight_decay",
        learning_rate=1e-2,
        weight_decay=0.5,
        optim_args="weight_decay_rate=0.2,exclude_from_weight_decay=LayerNorm|bias",
    )
    optimizer = HFTrainer(model=model, args=args).create_optimizer()
    before = zero_grad_step(model, optimizer)
    assert_decoupled_decay(
        model, before, lr=1e-2, weight_decay=0.2, excluded=lambda n: "LayerNorm" in n or "bias" in n
    )


def test_weight_decay_in_optim_args_needs_the_model(tmp_path):
    args = training_args(tmp_path, optim="adamw_hf", optim_args="weight_decay=0.2")
    with pytest.raises(ValueError, match="adamw_hf: weight_decay in optim_args needs Trainer's model"):
        HFTrainer.get_optimizer_cls_and_kwargs(args)
