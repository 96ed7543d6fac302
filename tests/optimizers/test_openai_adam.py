"""hf_optim.OpenAIAdam against the real pytorch-pretrained-bert 0.6.2 OpenAIAdam (tests/legacy/oracles, verbatim)."""

import logging

import pytest
import torch

import hf_optim
from hf_optim.legacy import pytorch_pretrained_bert as ours
from tests.legacy.harness import IMPLS, LEGACY, train

# One row per configuration; each builds its kwargs from a namespace so schedule objects come from that side.
CONFIGS = {
    "defaults_past_t_total": lambda ns: {"lr": 1e-2, "warmup": 0.1, "t_total": 10},
    "clip_and_decay": lambda ns: {
        "lr": 1e-2, "warmup": 0.1, "t_total": 20, "weight_decay": 0.01, "max_grad_norm": 1.0,
    },
    "decay_vectors_too": lambda ns: {"lr": 1e-2, "t_total": 20, "weight_decay": 0.1, "vector_l2": True},
    "clip_only": lambda ns: {"lr": 1e-2, "warmup": 0.2, "t_total": 20, "max_grad_norm": 2.0},
    "cosine": lambda ns: {"lr": 1e-2, "warmup": 0.1, "t_total": 12, "schedule": "warmup_cosine",
                          "weight_decay": 0.05},
    "constant_warmup": lambda ns: {"lr": 1e-2, "warmup": 0.3, "t_total": 8, "schedule": "warmup_constant"},
    "schedule_none": lambda ns: {"lr": 5e-3, "schedule": None, "b1": 0.8, "b2": 0.99, "e": 1e-6},
    "t_total_unset": lambda ns: {"lr": 5e-3, "weight_decay": 0.01},
    "warmup_restarts_object": lambda ns: {
        "lr": 1e-2, "weight_decay": 0.01,
        "schedule": ns.WarmupCosineWithWarmupRestartsSchedule(warmup=0.1, t_total=14, cycles=3.0),
    },
}  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layout", ["flat", "groups", "named"])
def test_legacy_module_is_bit_for_bit_legacy(config, layout, monkeypatch):
    # hf_optim.legacy's class defaults to the reference path: the fused kernel is never called
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    expected = train(LEGACY.OpenAIAdam, LEGACY, config, layout=layout)
    assert_same_run(expected, train(ours.OpenAIAdam, ours, config, layout=layout))
    assert not calls


def assert_same_run(expected, got):
    (e_params, e_opt, e_grads), (g_params, g_opt, g_grads) = expected, got
    for e, g in zip(e_params, g_params, strict=True):
        assert torch.equal(e, g)
    for e_step, g_step in zip(e_grads, g_grads, strict=True):
        for e, g in zip(e_step, g_step, strict=True):
            assert torch.equal(e, g)
    for e_state, g_state in zip(e_opt.state.values(), g_opt.state.values(), strict=True):
        assert set(g_state) == set(e_state)  # step, exp_avg, exp_avg_sq: the legacy state keys
        assert torch.equal(e_state["exp_avg"], g_state["exp_avg"])
        assert torch.equal(e_state["exp_avg_sq"], g_state["exp_avg_sq"])
        assert g_state["step"].item() == e_state["step"]
    assert g_opt.get_lr() == e_opt.get_lr()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("impl", ["foreach", "default"])
def test_fast_paths_match_legacy(config, impl):
    # two groups: the first runs the configuration as given, the second overrides lr, decay, clipping, schedule
    e_params, e_opt, _ = train(LEGACY.OpenAIAdam, LEGACY, config, layout="groups")
    g_params, g_opt, _ = train(ours.OpenAIAdam, ours, config, layout="groups", extra=IMPLS[impl])
    for e, g in zip(e_params, g_params, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for e_state, g_state in zip(e_opt.state.values(), g_opt.state.values(), strict=True):
        torch.testing.assert_close(g_state["exp_avg"], e_state["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_state["exp_avg_sq"], e_state["exp_avg_sq"], rtol=1e-5, atol=1e-6)


def test_default_path_uses_the_fused_kernel(monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(hf_optim.OpenAIAdam, ours, CONFIGS["decay_vectors_too"], steps=2)
    assert calls


@pytest.mark.parametrize("impl", IMPLS)
def test_parameters_without_gradient_and_uneven_steps(impl):
    config = CONFIGS["clip_and_decay"]
    skip = lambda step, i: i in (0, 1) and step % 3 == 0  # noqa: E731
    e_params, *_ = train(LEGACY.OpenAIAdam, LEGACY, config, skip=skip)
    g_params, *_ = train(ours.OpenAIAdam, ours, config, skip=skip, extra=IMPLS[impl])
    for e, g in zip(e_params, g_params, strict=True):
        if impl == "reference":
            assert torch.equal(e, g)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_warning_past_t_total_matches_legacy(caplog):
    config = CONFIGS["defaults_past_t_total"]
    with caplog.at_level(logging.WARNING):
        train(LEGACY.OpenAIAdam, LEGACY, config)
    legacy = [r.getMessage() for r in caplog.records if "beyond" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(ours.OpenAIAdam, ours, config, extra=IMPLS["default"])
    records = [r for r in caplog.records if "beyond" in r.getMessage()]
    assert [r.getMessage() for r in records] == legacy and legacy
    assert all(r.name.startswith("hf_optim.") for r in records)


def test_public_names():
    assert hf_optim.OpenAIAdam is hf_optim.optimizers.OpenAIAdam
    assert issubclass(ours.OpenAIAdam, hf_optim.OpenAIAdam) and ours.OpenAIAdam.__name__ == "OpenAIAdam"
    p = [torch.zeros(2, requires_grad=True)]
    assert ours.OpenAIAdam(p, lr=0.1).defaults["foreach"] is False
    assert ours.OpenAIAdam(p, lr=0.1).defaults["fused"] is False


def test_decay_factor_of_zero_on_the_default_path():
    # lr * schedule * weight_decay == 1: the fused kernel has no re-parametrisation; the result must still match
    config = lambda ns: {"lr": 0.5, "schedule": None, "weight_decay": 2.0}  # noqa: E731
    e_params, *_ = train(LEGACY.OpenAIAdam, LEGACY, config, steps=3)
    g_params, *_ = train(ours.OpenAIAdam, ours, config, steps=3, extra=IMPLS["default"])
    for e, g in zip(e_params, g_params, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
