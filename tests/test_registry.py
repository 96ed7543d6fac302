"""The optimizer / schedule registries: records, wildcards, errors, listeners, argument renaming and grouping."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import hf_optim
from hf_optim import registry


@pytest.fixture(autouse=True)
def isolated_registry():
    """Registrations and listeners a test adds are undone afterwards (the registry is process-global)."""
    with registry.snapshot(hooks=True):
        yield


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(3, 3)
        self.LayerNorm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2, bias=False)


BUILTIN_SCHEDULES = [
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_warmup_with_min_lr",
    "cosine_with_min_lr",
    "cosine_with_restarts",
    "inverse_sqrt",
    "linear",
    "polynomial",
    "warmup_stable_decay",
]


# registration order (listeners replay entries in it)
BUILTIN_SCHEDULES_IN_ORDER = [
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
]


def test_builtins_and_wildcards():
    assert hf_optim.list_optimizers(source="hf_optim") == [
        "adam_weight_decay",
        "adamw_hf",
        "bert_adam",
        "openai_adam",
    ]
    assert hf_optim.list_schedulers() == BUILTIN_SCHEDULES
    assert hf_optim.list_schedulers("cosine*") == [
        "cosine",
        "cosine_warmup_with_min_lr",
        "cosine_with_min_lr",
        "cosine_with_restarts",
    ]
    assert hf_optim.list_schedulers(["*_with_warmup", "lin?ar"]) == ["constant_with_warmup", "linear"]
    assert hf_optim.list_optimizers("sgd*", source="hf_optim") == []
    assert hf_optim.get_optimizer_info("adamw_hf").factory is hf_optim.AdamW
    assert hf_optim.get_optimizer_info("adam_weight_decay").factory is hf_optim.AdamWeightDecay
    assert hf_optim.get_scheduler_info("linear").factory is hf_optim.get_linear_schedule_with_warmup
    for name in hf_optim.list_optimizers(source="hf_optim"):
        assert hf_optim.get_optimizer_info(name).description
        assert hf_optim.get_optimizer_info(name).source == "hf_optim"
    for name in hf_optim.list_schedulers():
        assert hf_optim.get_scheduler_info(name).description


def test_records_are_frozen():
    info = hf_optim.get_optimizer_info("adam_weight_decay")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"
    with pytest.raises(TypeError):
        info.arg_names["lr"] = "x"
    assert dict(info.arg_names) == {
        "lr": "learning_rate",
        "weight_decay": "weight_decay_rate",
        "betas": ("beta_1", "beta_2"),
        "eps": "epsilon",
    }


def test_register_duplicate_needs_overwrite():
    hf_optim.register_optimizer("sgd", torch.optim.SGD, description="plain SGD", defaults={"momentum": 0.9})
    with pytest.raises(ValueError, match="already registered"):
        hf_optim.register_optimizer("sgd", torch.optim.Adam)
    with pytest.raises(ValueError, match="already registered"):
        hf_optim.register_scheduler("linear", hf_optim.get_constant_schedule)
    hf_optim.register_optimizer("sgd", torch.optim.Adam, overwrite=True)
    assert hf_optim.get_optimizer_info("sgd").factory is torch.optim.Adam


@pytest.mark.parametrize("name", ["", "has space", "wild*", 3, None])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="name"):
        hf_optim.register_optimizer(name, torch.optim.SGD)
    with pytest.raises(ValueError, match="name"):
        hf_optim.register_scheduler(name, hf_optim.get_constant_schedule)


def test_register_rejects_bad_records():
    with pytest.raises(ValueError, match="factory"):
        hf_optim.register_optimizer("x", "not callable")
    with pytest.raises(ValueError, match="arg_names"):
        hf_optim.register_optimizer("x", torch.optim.SGD, arg_names={"momentum": "m"})
    with pytest.raises(TypeError, match="defaults"):
        hf_optim.register_optimizer("x", torch.optim.SGD, defaults=[("lr", 1)])
    assert "x" not in hf_optim.list_optimizers(source="hf_optim")


def test_unknown_names_list_the_closest():
    with pytest.raises(ValueError, match=r"Did you mean 'adamw_hf'") as err:
        hf_optim.create_optimizer("adamw_fh", Model())
    assert "adam_weight_decay" in str(err.value)
    with pytest.raises(ValueError, match=r"Unknown scheduler 'cosin'. Did you mean 'cosine'"):
        hf_optim.get_scheduler_info("cosin")
    with pytest.raises(
        ValueError, match=r"Registered optimizers: adam_weight_decay, adamw_hf, bert_adam, openai_adam( |$)"
    ):
        hf_optim.get_optimizer_info("zzzzzz")


def test_listeners_see_existing_and_new_entries_and_cannot_break_registration(caplog):
    seen = []
    hf_optim.add_registry_listener(lambda kind, info: seen.append((kind, info.name)))
    assert seen == [
        ("optimizer", n) for n in ("adamw_hf", "adam_weight_decay", "bert_adam", "openai_adam")
    ] + [("scheduler", n) for n in BUILTIN_SCHEDULES_IN_ORDER]

    def broken(kind, info):
        raise RuntimeError("listener bug")

    with caplog.at_level(logging.ERROR, logger="hf_optim.registry"):
        hf_optim.add_registry_listener(broken)
        hf_optim.register_optimizer("sgd", torch.optim.SGD)
        hf_optim.register_scheduler("step", torch.optim.lr_scheduler.StepLR)
    assert "listener bug" in caplog.text
    assert seen[-2:] == [("optimizer", "sgd"), ("scheduler", "step")]
    assert "sgd" in hf_optim.list_optimizers(source="hf_optim") and "step" in hf_optim.list_schedulers()
    hf_optim.remove_registry_listener(broken)
    hf_optim.register_optimizer("sgd2", torch.optim.SGD)
    assert seen[-1] == ("optimizer", "sgd2")


# ----------------------------------------------------------------------------------------------------------------
# create_optimizer
# ----------------------------------------------------------------------------------------------------------------


def test_create_adamw_from_model_groups_and_names():
    model = Model()
    opt = hf_optim.create_optimizer("adamw_hf", model, lr=3e-4, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-8)
    assert isinstance(opt, hf_optim.AdamW)
    assert opt.hf_optim_name == "adamw_hf"
    assert hf_optim.optimizer_name(opt) == "adamw_hf"
    decay, no_decay = opt.param_groups
    assert decay["param_names"] == ["dense.weight", "out.weight"]
    assert no_decay["param_names"] == ["dense.bias", "LayerNorm.weight", "LayerNorm.bias"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    for group in (decay, no_decay):
        assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-8


def test_create_adam_weight_decay_maps_common_names():
    model = Model()
    opt = hf_optim.create_optimizer(
        "adam_weight_decay",
        model,
        lr=2e-3,
        weight_decay=0.05,
        betas=(0.7, 0.95),
        eps=1e-9,
        exclude_from_weight_decay=["out"],
    )
    assert isinstance(opt, hf_optim.AdamWeightDecay)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["dense.weight"],
        ["dense.bias", "LayerNorm.weight", "LayerNorm.bias", "out.weight"],
    ]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for group in opt.param_groups:  # the optimizer keeps torch-style keys (contract)
        assert group["lr"] == 2e-3 and tuple(group["betas"]) == (0.7, 0.95) and group["eps"] == 1e-9
    # the optimizer's own names work as well
    own = hf_optim.create_optimizer("adam_weight_decay", model, learning_rate=2e-3, beta_1=0.7)
    assert own.param_groups[0]["lr"] == 2e-3 and own.param_groups[0]["betas"][0] == 0.7


def test_create_optimizer_argument_errors():
    model = Model()
    with pytest.raises(ValueError, match=r"learning_rate.*given twice"):
        hf_optim.create_optimizer("adam_weight_decay", model, lr=1e-3, learning_rate=1e-3)
    with pytest.raises(ValueError, match="betas must be a sequence of 2"):
        hf_optim.create_optimizer("adam_weight_decay", model, betas=0.9)
    with pytest.raises(ValueError, match=r"does not accept argument.*momentum"):
        hf_optim.create_optimizer("adamw_hf", model, momentum=0.9)
    with pytest.raises(ValueError, match="single Tensor"):
        hf_optim.create_optimizer("adamw_hf", torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="exclude_from_weight_decay"):
        hf_optim.create_optimizer("adamw_hf", model, weight_decay=0.1, exclude_from_weight_decay=["("])


def test_registered_torch_optimizer_with_defaults_steps_like_a_hand_built_one():
    hf_optim.register_optimizer("sgd", torch.optim.SGD, description="SGD", defaults={"momentum": 0.9})
    torch.manual_seed(0)
    model = Model()
    twin = Model()
    twin.load_state_dict(model.state_dict())
    opt = hf_optim.create_optimizer("sgd", model, lr=0.1, weight_decay=0.5)
    # the reference: Trainer-style groups written out by hand
    ref = torch.optim.SGD(
        [
            {"params": [twin.dense.weight, twin.out.weight], "weight_decay": 0.5},
            {"params": [twin.dense.bias, twin.LayerNorm.weight, twin.LayerNorm.bias], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    x = torch.randn(5, 3)
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m.out(m.LayerNorm(m.dense(x))).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del opt.hf_optim_name
    assert hf_optim.optimizer_name(opt) == "sgd"  # reverse lookup by class


def test_params_are_passed_through():
    model = Model()
    plain = hf_optim.create_optimizer("adamw_hf", list(model.parameters()), lr=1e-3, weight_decay=0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.1
    named = hf_optim.create_optimizer("adamw_hf", model.named_parameters(), weight_decay=0.1)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    groups = hf_optim.create_optimizer(
        "adamw_hf", [{"params": [model.dense.weight], "lr": 0.5}, {"params": [model.dense.bias]}], lr=1e-3
    )
    assert [g["lr"] for g in groups.param_groups] == [0.5, 1e-3]
    # AdamWeightDecay applies its own name rule to named parameters it receives directly
    awd = hf_optim.create_optimizer(
        "adam_weight_decay", model.named_parameters(), weight_decay=0.1, exclude_from_weight_decay=["bias"]
    )
    assert awd.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_optimizer_name_unwraps_and_returns_none_for_unknown():
    opt = torch.optim.Adagrad(Model().parameters())
    assert hf_optim.optimizer_name(opt) is None

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    named = hf_optim.create_optimizer("adamw_hf", Model())
    assert hf_optim.optimizer_name(Wrapper(named)) == "adamw_hf"


# ----------------------------------------------------------------------------------------------------------------
# create_scheduler with user-registered factories
# ----------------------------------------------------------------------------------------------------------------


def test_registered_torch_scheduler_records_its_arguments():
    hf_optim.register_scheduler("step", torch.optim.lr_scheduler.StepLR, description="step decay")
    opt = torch.optim.SGD(Model().parameters(), lr=1.0)
    scheduler = hf_optim.create_scheduler("step", opt, num_warmup_steps=5, num_training_steps=50, step_size=2)
    assert scheduler.hf_optim_config == {"name": "step", "kwargs": {"step_size": 2, "gamma": 0.1}}
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="step_size"):
        hf_optim.create_scheduler("step", opt, 5, 50)


def test_alias_of_a_builtin_schedule_rebuilds_under_its_own_name():
    hf_optim.register_scheduler("my_linear", hf_optim.get_linear_schedule_with_warmup)
    opt = torch.optim.SGD(Model().parameters(), lr=1.0)
    scheduler = hf_optim.create_scheduler("my_linear", opt, 2, 10)
    assert scheduler.hf_optim_config == {
        "name": "my_linear",
        "kwargs": {"num_warmup_steps": 2, "num_training_steps": 10},
    }
    rebuilt = hf_optim.scheduler_from_config(
        torch.optim.SGD(Model().parameters(), lr=1.0), scheduler.hf_optim_config
    )
    assert rebuilt.lr_lambdas[0](6) == 0.5  # (10 - 6) / 8


def test_non_json_scheduler_arguments_are_rejected():
    def custom(optimizer, fn):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

    hf_optim.register_scheduler("custom", custom)
    opt = torch.optim.SGD(Model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=r"fn=.*JSON"):
        hf_optim.create_scheduler("custom", opt, fn=lambda step: 1.0)
    assert "initial_lr" not in opt.param_groups[0]  # refused before the scheduler touched the optimizer


# ----------------------------------------------------------------------------------------------------------------
# Registry instances, snapshot() and the public introspection
# ----------------------------------------------------------------------------------------------------------------


def test_snapshot_restores_entries_and_optionally_hooks():
    own = registry.Registry()
    own.register_optimizer("sgd", torch.optim.SGD)
    seen = []
    with own.snapshot():
        own.register_optimizer("adam", torch.optim.Adam)
        own.register_optimizer("sgd", torch.optim.Adam, overwrite=True)
        own.add_listener(lambda kind, info: seen.append(info.name))
    assert own.list_optimizers() == ["sgd"]
    assert own.get_optimizer_info("sgd").factory is torch.optim.SGD
    own.register_optimizer("later", torch.optim.SGD)  # the listener stayed (hooks=False)
    assert seen == ["sgd", "adam", "later"]  # replay of the entries at the time, then the new one
    with own.snapshot(hooks=True):
        own.add_listener(lambda kind, info: seen.append("second " + info.name))
    own.register_optimizer("last", torch.optim.SGD)
    assert seen[-1] == "last"
    with pytest.raises(RuntimeError, match="body"), own.snapshot():  # restored on errors too
        own.register_scheduler("step", torch.optim.lr_scheduler.StepLR)
        raise RuntimeError("body")
    assert own.list_schedulers() == []


def test_registry_instances_are_independent_of_the_default_one():
    own = registry.Registry()
    own.register_optimizer("only_here", torch.optim.SGD)
    assert "only_here" not in hf_optim.list_optimizers(source="hf_optim")
    assert registry.default_registry.list_optimizers(source="hf_optim") == [
        "adam_weight_decay",
        "adamw_hf",
        "bert_adam",
        "openai_adam",
    ]
    opt = own.create_optimizer("only_here", Model(), lr=0.1)
    assert type(opt) is torch.optim.SGD and opt.hf_optim_name == "only_here"


class _Provider:
    source = "elsewhere"

    def names(self):
        return ["far_sgd"]

    def info(self, name):
        if name != "far_sgd":
            return None
        return registry.OptimizerInfo(name, torch.optim.SGD, "SGD from elsewhere", source=self.source)


def test_providers_add_names_with_their_source():
    own = registry.Registry()
    own.register_optimizer("sgd", torch.optim.SGD)
    own.add_optimizer_provider(_Provider())
    assert own.list_optimizers() == ["far_sgd", "sgd"]
    assert own.list_optimizers(source="elsewhere") == ["far_sgd"]
    assert own.list_optimizers(source="hf_optim") == ["sgd"]
    info = own.get_optimizer_info("far_sgd")
    assert info.source == "elsewhere"
    assert type(own.create_optimizer("far_sgd", Model(), lr=0.1)) is torch.optim.SGD
    with pytest.raises(
        ValueError, match=r"Did you mean 'far_sgd'.*Registered optimizers: sgd \(and those of elsewhere"
    ):
        own.get_optimizer_info("far_sdg")
    with pytest.raises(ValueError, match="source"):
        own.add_optimizer_provider(type("P", (), {"source": "hf_optim"})())
    own.remove_optimizer_provider("elsewhere")
    assert own.list_optimizers() == ["sgd"]


def test_public_introspection_of_records():
    awd = hf_optim.get_optimizer_info("adam_weight_decay")
    assert awd.map_common({"lr": 1e-3, "betas": (0.8, 0.9), "amsgrad": True}, "x") == {
        "learning_rate": 1e-3,
        "beta_1": 0.8,
        "beta_2": 0.9,
        "amsgrad": True,
    }
    assert awd.own_name("eps") == "epsilon" and awd.own_name("momentum") == "momentum"
    assert awd.accepts("weight_decay_rate") and not awd.accepts("weight_decay")
    assert not awd.takes_var_keyword()
    names = [p.name for p in awd.keyword_parameters()]
    assert names[0] == "learning_rate" and "params" not in names
    assert awd.signature() == registry.signature_of(hf_optim.AdamWeightDecay)

    def with_kwargs(params, lr=1.0, **extra):
        return torch.optim.SGD(params, lr=lr)

    sig = registry.signature_of(with_kwargs)
    assert registry.accepts_argument(sig, "anything") and registry.accepts_argument(None, "anything")
    assert [p.name for p in registry.keyword_parameters(sig)] == ["lr"]
    assert registry.signature_of(print) is None or registry.accepts_argument(
        registry.signature_of(print), "sep"
    )


@pytest.mark.parametrize(
    ("asked", "found"),
    [("AdamW_HF", "adamw_hf"), ("BERT_ADAM", "bert_adam"), ("Adam_Weight_Decay", "adam_weight_decay")],
)
def test_optimizer_names_match_ignoring_case(asked, found):
    assert hf_optim.get_optimizer_info(asked).name == found


def test_scheduler_names_match_ignoring_case():
    assert hf_optim.get_scheduler_info("Cosine_With_Restarts").name == "cosine_with_restarts"


def test_suggestions_ignore_case():
    with pytest.raises(ValueError, match="Did you mean 'adamw_hf'") as err:
        hf_optim.get_optimizer_info("ADAMW")
    assert "adalomo" not in str(err.value).split("Registered")[0]


def test_legacy_module_optimizers_keep_their_registry_names():
    from hf_optim.legacy import pytorch_pretrained_bert, pytorch_transformers

    p = [torch.zeros(2, requires_grad=True)]
    assert hf_optim.optimizer_name(pytorch_pretrained_bert.BertAdam(p, lr=0.1)) == "bert_adam"
    assert hf_optim.optimizer_name(pytorch_pretrained_bert.OpenAIAdam(p, lr=0.1)) == "openai_adam"
    assert hf_optim.optimizer_name(pytorch_transformers.AdamW(p)) == "adamw_hf"
