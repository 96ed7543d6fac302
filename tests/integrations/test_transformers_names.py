"""hf_optim names inside transformers: TrainingArguments / HfArgumentParser / Trainer dispatch, the start-up hook.

References used here are independent of hf_optim's code: transformers' own enum/parser/Trainer behaviour, the
legacy decay rule written out (``p <- p * (1 - lr * wd)`` for a step with zero gradients), BERT's parameter
naming (biases and LayerNorm weights are Trainer's no-decay group) and schedules written out as formulas.
Fresh interpreters (``subprocess``) check import orders and the ``.pth`` hook.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from enum import Enum
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim.integrations.transformers import names

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    TrainingArguments,
)
from transformers import Trainer as HFTrainer  # noqa: E402
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402
from transformers.trainer_utils import SchedulerType  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HF_OPTIM_NAMES = ("adamw_hf", "adam_weight_decay")


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def no_decay_by_bert_naming(name: str) -> bool:
    """Trainer's rule for BERT, written out: biases and LayerNorm weights get no weight decay."""
    return "bias" in name or "LayerNorm" in name


def zero_grad_step(model, optimizer) -> dict[str, torch.Tensor]:
    """One optimizer step with all-zero gradients; returns the parameters before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


def assert_decoupled_decay(
    model, before, *, lr: float, weight_decay: float, excluded=no_decay_by_bert_naming
):
    """After a zero-gradient step the Adam term is 0: decayed weights are ``p * (1 - lr * wd)``, the rest as before."""
    for n, p in model.named_parameters():
        factor = 1.0 if excluded(n) else 1.0 - lr * weight_decay
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)


def start_python(args: list[str], *, autoload: bool, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("HF_OPTIM_DISABLE_AUTOLOAD", None)
    if not autoload:
        env["HF_OPTIM_DISABLE_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )


# ---------------------------------------------------------------------------------------------------------------
# Names in TrainingArguments, HfArgumentParser and the dispatch tables (this process: hf_optim imported first)
# ---------------------------------------------------------------------------------------------------------------


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
    names.sync()
    names.register()
    names.sync()
    assert list(OptimizerNames) == members_before
    assert dict(_OPTIMIZER_HANDLERS) == handlers_before
    assert [m.value for m in OptimizerNames].count("adamw_hf") == 1


def test_names_with_the_same_member_name_all_parse(tmp_path):
    """``x_hf``, ``x-hf`` and ``x.hf`` map to one identifier: each gets its own member and parses as itself."""
    stem = f"t{uuid.uuid4().hex[:8]}"
    values = [f"{stem}_hf", f"{stem}-hf", f"{stem}.hf"]
    for value in values:
        hf_optim.register_optimizer(value, torch.optim.SGD)
    choices = next(a for a in HfArgumentParser(TrainingArguments)._actions if a.dest == "optim").choices
    assert len(choices) == len(set(choices)) == len(OptimizerNames)
    for value in values:
        assert OptimizerNames(value).value == value
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", value, "--report_to", "none", "--use_cpu"]
        )
        assert args.optim is OptimizerNames(value)
        assert training_args(tmp_path, optim=value).optim.value == value
        assert pickle.loads(pickle.dumps(args.optim)) is args.optim
        assert type(HFTrainer(model=tiny_bert(), args=args).create_optimizer()) is torch.optim.SGD


class _NoIteration(type(OptimizerNames)):
    """An enum metaclass that lists no members: a member added at run time never shows up."""

    def __iter__(cls):
        return iter(())


def test_failed_enum_member_is_rolled_back():
    class broken(str, Enum, metaclass=_NoIteration):
        KEPT = "kept"

    with pytest.raises(names.TransformersIntegrationError, match="'new-value'"):
        names.add_enum_member(broken, "new-value")
    # Nothing of the attempt is left: no class attribute, member or value.
    assert "NEW_VALUE" not in vars(broken)
    assert set(broken.__members__) == {"KEPT"}
    assert set(broken._value2member_map_) == {"kept"}
    assert broken._member_names_ == ["KEPT"]


def test_transformers_own_schedule_names_stay_transformers():
    # hf_optim registers "cosine", "linear", ... too; Trainer must keep building transformers' own schedules.
    for member in SchedulerType:
        assert TYPE_TO_SCHEDULER_FUNCTION[member].__module__ == "transformers.optimization"
    assert set(hf_optim.list_schedulers()) <= {m.value for m in SchedulerType}


# ---------------------------------------------------------------------------------------------------------------
# TrainingArguments -> optimizer arguments, optim_args, Trainer's decay grouping
# ---------------------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("correct_bias=maybe", "correct_bias='maybe'"),
        ("nonexistent=1", "'nonexistent' is not an argument of optimizer 'adamw_hf'"),
        ("foreach=sometimes", "foreach='sometimes'"),
    ],
)
def test_bad_optim_args_name_the_argument(tmp_path, optim_args, message):
    args = training_args(tmp_path, optim="adamw_hf", optim_args=optim_args)
    with pytest.raises(ValueError, match="optim_args") as info:
        HFTrainer(model=tiny_bert(), args=args).create_optimizer()
    assert message in str(info.value)


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
    monkeypatch.setattr(names, "_warned", set())
    with pytest.raises(names.TransformersIntegrationError) as info:
        names.register()
    assert f"transformers {transformers.__version__}" in str(info.value)
    assert "_OPTIMIZER_HANDLERS" in str(info.value)
    with caplog.at_level(logging.WARNING, logger=names.__name__):
        names.sync()  # the import-hook path logs instead of raising
    assert any(f"transformers {transformers.__version__}" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# Fresh interpreters: import orders, the start-up hook (on / off / failing), installed files
# ---------------------------------------------------------------------------------------------------------------

CHECK_NAMES = """
import hf_optim
from transformers import HfArgumentParser, Trainer, TrainingArguments
args = TrainingArguments(output_dir="out", optim="adamw_hf", report_to=[], use_cpu=True)
choices = next(a for a in HfArgumentParser(TrainingArguments)._actions if a.dest == "optim").choices
cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
assert cls is hf_optim.AdamW, cls
assert "adam_weight_decay" in choices and "adamw_hf" in choices
print("OK", args.optim.value, sorted(kwargs))
"""

UNMODIFIED_SCRIPT = """
import sys
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=1, intermediate_size=16))
optimizer = Trainer(model=model, args=args).create_optimizer()
print("OPTIMIZER", type(optimizer).__module__ + "." + type(optimizer).__qualname__, optimizer.param_groups[0]["eps"])
"""

NEVER_RAISES = """
import sys
sys.modules["hf_optim.integrations.transformers"] = None  # importing it now raises ImportError
from transformers import TrainingArguments
TrainingArguments(output_dir="out", optim="adamw_torch", report_to=[])
try:
    TrainingArguments(output_dir="out", optim="adamw_hf", report_to=[])
except ValueError:
    print("NOT-REGISTERED")
"""

HOOK_STATE = """
import json, sys
print(json.dumps({
    "hook": "_hf_optim_autoload" in sys.modules,
    "finder": any(getattr(f, "_hf_optim_autoload_finder", False) for f in sys.meta_path),
    "heavy": sorted(m for m in sys.modules
                    if m.split(".")[0] in ("torch", "transformers", "hf_optim", "numpy", "huggingface_hub", "logging")),
}))
"""


IMPORT_HF_OPTIM = """
import json, sys
import hf_optim
before = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "accelerate"))
import transformers
print(json.dumps({"before": before, "lazy_trainer": transformers.Trainer in hf_optim.Trainer.__mro__}))
"""


class FreshInterpreters:
    """Starts every fresh-interpreter check at once (they mostly wait on imports) and hands out the results."""

    def __init__(self, directory: Path) -> None:
        script = directory / "train.py"
        script.write_text(UNMODIFIED_SCRIPT)
        unmodified = [
            str(script),
            "--output_dir",
            str(directory / "out"),
            "--optim",
            "adamw_hf",
            "--adam_epsilon",
            "1e-7",
            "--report_to",
            "none",
            "--use_cpu",
        ]
        cases = {
            "hf_optim-first": (["-c", "import hf_optim\n" + CHECK_NAMES], False),
            "transformers-first": (["-c", "import transformers.trainer\n" + CHECK_NAMES], False),
            "unmodified-autoload": (unmodified, True),
            "unmodified-no-autoload": (unmodified, False),
            "never-raises": (["-c", NEVER_RAISES], True),
            "hook-state": (["-c", HOOK_STATE], True),
            "hook-state-disabled": (["-c", HOOK_STATE], False),
            "import-hf_optim": (["-c", IMPORT_HF_OPTIM], True),
        }
        self._processes = {
            name: start_python(args, autoload=autoload, cwd=directory)
            for name, (args, autoload) in cases.items()
        }
        self._results: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._results:
            process = self._processes[name]
            stdout, stderr = process.communicate(timeout=600)
            self._results[name] = subprocess.CompletedProcess(
                process.args, process.returncode, stdout, stderr
            )
        return self._results[name]

    def close(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    runs = FreshInterpreters(tmp_path_factory.mktemp("fresh"))
    yield runs
    runs.close()


@pytest.mark.parametrize("first", ["hf_optim-first", "transformers-first"])
def test_either_import_order_works_without_autoload(fresh, first):
    result = fresh[first]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK adamw_hf ['betas', 'eps', 'lr', 'weight_decay']"), result.stdout


def test_unmodified_script_with_autoload(fresh):
    """A script that never imports hf_optim gets --optim adamw_hf and hf_optim's AdamW from Trainer."""
    result = fresh["unmodified-autoload"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OPTIMIZER hf_optim.optimizers.adamw.AdamW 1e-07" in result.stdout


def test_unmodified_script_with_autoload_disabled(fresh):
    result = fresh["unmodified-no-autoload"]
    assert result.returncode == 2
    assert "invalid choice: 'adamw_hf'" in result.stderr


def test_startup_hook_is_installed_and_imports_nothing_heavy(fresh):
    assert json.loads(fresh["hook-state"].stdout) == {"hook": True, "finder": True, "heavy": []}
    assert json.loads(fresh["hook-state-disabled"].stdout) == {"hook": True, "finder": False, "heavy": []}


def test_startup_hook_never_raises(fresh):
    """A broken integration (here: not importable) must not break importing transformers."""
    result = fresh["never-raises"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "NOT-REGISTERED"
    assert "Traceback" not in result.stderr


def test_import_hf_optim_does_not_import_transformers(fresh):
    result = fresh["import-hf_optim"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"before": [], "lazy_trainer": True}


def test_install_puts_the_hook_in_site_packages():
    """`pip install [-e] .` (hatch_build.py) installs the .pth and the top-level copy of hf_optim/_autoload.py."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    pth = purelib / "hf_optim_autoload.pth"
    module = purelib / "_hf_optim_autoload.py"
    assert pth.is_file(), f"{pth} missing: reinstall with `pip install -e . --no-deps`"
    assert pth.read_text().strip() == "import _hf_optim_autoload"
    assert module.read_bytes() == (ROOT / "hf_optim" / "_autoload.py").read_bytes(), (
        f"{module} is stale: reinstall with `pip install -e . --no-deps`"
    )


def test_wheel_ships_the_package_module_and_the_top_level_hook(tmp_path):
    """The regular wheel holds ``hf_optim/_autoload.py`` and its top-level copy beside the ``.pth``."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_optim-*.whl")
    with zipfile.ZipFile(wheel) as z:
        source = (ROOT / "hf_optim" / "_autoload.py").read_bytes()
        assert z.read("hf_optim/_autoload.py") == source
        assert z.read("_hf_optim_autoload.py") == source
        assert z.read("hf_optim_autoload.pth").decode().strip() == "import _hf_optim_autoload"
