"""hf_optim names inside transformers: TrainingArguments / HfArgumentParser / dispatch tables, listeners and
errors (hf_optim.integrations.transformers.bridge).

References: transformers' own enum / parser / Trainer behaviour and schedules written out as formulas."""

from __future__ import annotations

import json
import logging
import pickle
import uuid

import pytest
import torch

import hf_optim
from hf_optim.errors import TransformersIntegrationError
from hf_optim.integrations.transformers import bridge

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    HfArgumentParser,
    TrainingArguments,
)
from transformers import Trainer as HFTrainer  # noqa: E402
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402
from transformers.trainer_utils import SchedulerType  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

from tests.integrations.transformers_helpers import (  # noqa: E402
    HF_OPTIM_NAMES,
    tiny_bert,
    training_args,
)


@pytest.mark.parametrize("name", HF_OPTIM_NAMES)
def test_training_arguments_accept_hf_optim_names(tmp_path, name):
    args = training_args(tmp_path, optim=name)
    assert isinstance(args.optim, OptimizerNames)
    assert args.optim.value == name and args.optim == name
    assert OptimizerNames(name) is args.optim
    # training_args.bin is a pickle of the arguments: the added member must round-trip as the same member
    assert pickle.loads(pickle.dumps(args.optim)) is args.optim
    assert json.loads(args.to_json_string())["optim"] == name


def test_hf_argument_parser_lists_and_parses_names(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (action,) = [a for a in parser._actions if a.dest == "optim"]
    for name in HF_OPTIM_NAMES:
        assert name in action.choices
        assert name in parser.format_help()
    # transformers' own names are all still there, once each
    assert all(m.value in action.choices for m in OptimizerNames)
    assert len(action.choices) == len(set(action.choices)) == len(OptimizerNames)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--optim",
            "adamw_hf",
            "--optim_args",
            "correct_bias=False",
            "--report_to",
            "none",
            "--use_cpu",
        ]
    )
    assert args.optim is OptimizerNames("adamw_hf")
    assert args.optim_args == "correct_bias=False"


def test_registration_is_idempotent():
    members_before = list(OptimizerNames)
    handlers_before = dict(_OPTIMIZER_HANDLERS)
    bridge.sync()
    bridge.register()
    bridge.sync()
    assert list(OptimizerNames) == members_before
    assert dict(_OPTIMIZER_HANDLERS) == handlers_before
    assert [m.value for m in OptimizerNames].count("adamw_hf") == 1


def test_transformers_own_schedule_names_stay_transformers():
    # hf_optim registers "cosine", "linear", ... too; Trainer must keep building transformers' own schedules.
    # (Members hf_optim added for names that earlier tests registered are the only ones served by hf_optim.)
    added = set(bridge.registered_names()["schedulers"])
    assert added.isdisjoint(hf_optim.list_schedulers())
    for member in SchedulerType:
        if member.value not in added:
            assert TYPE_TO_SCHEDULER_FUNCTION[member].__module__ == "transformers.optimization"
    assert set(hf_optim.list_schedulers()) <= {m.value for m in SchedulerType}


def test_optimizer_registered_later_reaches_trainer(tmp_path):
    name = f"test_sgd_{uuid.uuid4().hex[:8]}"
    hf_optim.register_optimizer(name, torch.optim.SGD, description="plain SGD for a test")
    assert name in [m.value for m in OptimizerNames]
    parser = HfArgumentParser(TrainingArguments)
    assert name in next(a for a in parser._actions if a.dest == "optim").choices
    args = training_args(
        tmp_path,
        optim=name,
        learning_rate=0.05,
        weight_decay=0.01,
        optim_args="momentum=0.9,nesterov=true,dampening=0",
    )
    optimizer = HFTrainer(model=tiny_bert(), args=args).create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert group["lr"] == 0.05
        assert group["momentum"] == 0.9 and isinstance(group["momentum"], float)
        assert group["nesterov"] is True
        assert group["dampening"] == 0.0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_schedule_registered_later_becomes_lr_scheduler_type(tmp_path):
    name = f"test_halving_{uuid.uuid4().hex[:8]}"

    def halving(optimizer, num_warmup_steps, num_training_steps, every=2):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step // every))

    hf_optim.register_scheduler(name, halving)
    args = training_args(
        tmp_path,
        optim="adamw_hf",
        learning_rate=0.1,
        lr_scheduler_type=name,
        lr_scheduler_kwargs={"every": 3},
    )
    assert args.lr_scheduler_type is SchedulerType(name)
    trainer = hf_optim.Trainer(model=tiny_bert(), args=args)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=10)
    assert scheduler.hf_optim_config["name"] == name
    assert scheduler.hf_optim_config["kwargs"]["every"] == 3
    lrs = []
    for _ in range(8):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1 * 0.5 ** (s // 3) for s in range(8)], rel=1e-12)


def test_changed_transformers_internals_give_a_clear_error(monkeypatch, caplog):
    import transformers.trainer_optimizer as trainer_optimizer

    monkeypatch.setattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", ())
    monkeypatch.setattr(bridge, "_warned", set())
    with pytest.raises(TransformersIntegrationError) as info:
        bridge.register()
    assert f"transformers {transformers.__version__}" in str(info.value)
    assert "_OPTIMIZER_HANDLERS" in str(info.value)
    with caplog.at_level(logging.WARNING, logger=bridge.__name__):
        bridge.sync()  # the import-hook path logs instead of raising
    assert any(f"transformers {transformers.__version__}" in r.getMessage() for r in caplog.records)
