"""hf_optim.BertAdam against the real pytorch-pretrained-bert 0.6.2 BertAdam (tests/legacy/oracles, verbatim)."""

import logging

import pytest
import torch

import hf_optim
from hf_optim.legacy import pytorch_pretrained_bert as ours
from tests.legacy.harness import IMPLS, LEGACY, train

# One row per configuration; each builds its kwargs from a namespace so schedule objects come from that side.
CONFIGS = {
    "linear_clip_decay_past_t_total": lambda ns: {"lr": 1e-2, "warmup": 0.1, "t_total": 10},
    "no_clip_no_decay": lambda ns: {
        "lr": 1e-2, "warmup": 0.1, "t_total": 20, "max_grad_norm": -1, "weight_decay": 0.0,
    },
    "clip_only": lambda ns: {"lr": 1e-2, "warmup": 0.2, "t_total": 20, "weight_decay": 0.0, "max_grad_norm": 2.0},
    "decay_only": lambda ns: {"lr": 1e-2, "t_total": 20, "weight_decay": 0.1, "max_grad_norm": 0},
    "cosine": lambda ns: {"lr": 1e-2, "warmup": 0.1, "t_total": 12, "schedule": "warmup_cosine"},
    "constant_warmup": lambda ns: {"lr": 1e-2, "warmup": 0.3, "t_total": 8, "schedule": "warmup_constant"},
    "schedule_none": lambda ns: {"lr": 5e-3, "schedule": None, "b1": 0.8, "b2": 0.99, "e": 1e-8},
    "schedule_string_none": lambda ns: {"lr": 5e-3, "schedule": "none"},
    "t_total_unset": lambda ns: {"lr": 5e-3},
    "hard_restarts_object": lambda ns: {
        "lr": 1e-2, "schedule": ns.WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=10, cycles=2.0),
    },
    "warmup_restarts_object": lambda ns: {
        "lr": 1e-2, "schedule": ns.WarmupCosineWithWarmupRestartsSchedule(warmup=0.1, t_total=14, cycles=3.0),
    },
}  # fmt: skip


def assert_same_run(expected, got):
    (e_params, e_opt, e_grads), (g_params, g_opt, g_grads) = expected, got
    for e, g in zip(e_params, g_params, strict=True):
        assert torch.equal(e, g)
    for e_step, g_step in zip(e_grads, g_grads, strict=True):  # clipped in place, as the legacy code did
        for e, g in zip(e_step, g_step, strict=True):
            assert (e is None and g is None) or torch.equal(e, g)
    for e_state, g_state in zip(e_opt.state.values(), g_opt.state.values(), strict=True):
        assert set(g_state) == set(e_state)  # step, next_m, next_v: the legacy state keys
        assert torch.equal(e_state["next_m"], g_state["next_m"])
        assert torch.equal(e_state["next_v"], g_state["next_v"])
        assert g_state["step"].item() == e_state["step"]
    assert g_opt.get_lr() == e_opt.get_lr()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layout", ["flat", "groups", "named"])
def test_legacy_module_is_bit_for_bit_legacy(config, layout, monkeypatch):
    # hf_optim.legacy's class defaults to the reference path: the fused kernel is never called
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    expected = train(LEGACY.BertAdam, LEGACY, config, layout=layout)
    assert_same_run(expected, train(ours.BertAdam, ours, config, layout=layout))
    assert not calls


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("impl", ["foreach", "default"])
def test_fast_paths_match_legacy(config, impl):
    # two groups: the first runs the configuration as given, the second overrides lr, decay, clipping, schedule
    e_params, e_opt, e_grads = train(LEGACY.BertAdam, LEGACY, config, layout="groups")
    g_params, g_opt, g_grads = train(ours.BertAdam, ours, config, layout="groups", extra=IMPLS[impl])
    for e, g in zip(e_params, g_params, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for e_state, g_state in zip(e_opt.state.values(), g_opt.state.values(), strict=True):
        torch.testing.assert_close(g_state["next_m"], e_state["next_m"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_state["next_v"], e_state["next_v"], rtol=1e-5, atol=1e-6)
    for e, g in zip(e_grads[-1], g_grads[-1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_default_path_uses_the_fused_kernel(monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(hf_optim.BertAdam, ours, CONFIGS["linear_clip_decay_past_t_total"], steps=2)
    assert calls


@pytest.mark.parametrize("impl", IMPLS)
def test_parameters_without_gradient_and_uneven_steps(impl):
    # parameter 1 misses every third step: its step count falls behind, so the schedule differs per parameter
    config = CONFIGS["linear_clip_decay_past_t_total"]
    skip = lambda step, i: i == 1 and step % 3 == 0  # noqa: E731
    e_params, *_ = train(LEGACY.BertAdam, LEGACY, config, skip=skip)
    g_params, *_ = train(ours.BertAdam, ours, config, skip=skip, extra=IMPLS[impl])
    for e, g in zip(e_params, g_params, strict=True):
        if impl == "reference":
            assert torch.equal(e, g)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_warning_past_t_total_matches_legacy(caplog):
    config = CONFIGS["linear_clip_decay_past_t_total"]
    with caplog.at_level(logging.WARNING):
        train(LEGACY.BertAdam, LEGACY, config, layout="groups")
    legacy = [r.getMessage() for r in caplog.records if "beyond" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(ours.BertAdam, ours, config, layout="groups", extra=IMPLS["default"])
    records = [r for r in caplog.records if "beyond" in r.getMessage()]
    assert [r.getMessage() for r in records] == legacy and legacy
    assert all(r.name.startswith("hf_optim.") for r in records)


def test_loads_a_legacy_state_dict_and_continues_exactly():
    config = CONFIGS["no_clip_no_decay"]
    straight, _, _ = train(LEGACY.BertAdam, LEGACY, config, steps=10)
    params_legacy, legacy_opt, _ = train(LEGACY.BertAdam, LEGACY, config, steps=5)
    saved = legacy_opt.state_dict()  # int steps, the oracle's schedule objects: as an old script had them
    params = [p.clone().requires_grad_() for p in params_legacy]
    opt = ours.BertAdam(params, **config(ours), foreach=False, fused=False)
    saved["param_groups"][0]["schedule"] = ours.WarmupLinearSchedule(warmup=0.1, t_total=20)
    opt.load_state_dict(saved)
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        grads = [torch.randn(p.shape, generator=g) * 3.0 for p in params]
        if step >= 5:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            opt.step()
    for s, r in zip(straight, params, strict=True):
        assert torch.equal(s, r.detach())


def test_public_names():
    assert hf_optim.BertAdam is hf_optim.optimizers.BertAdam
    # the legacy module's class: the same optimizer, with the bit-for-bit path as its default
    assert issubclass(ours.BertAdam, hf_optim.BertAdam) and ours.BertAdam.__name__ == "BertAdam"
    p = [torch.zeros(2, requires_grad=True)]
    assert (ours.BertAdam(p, lr=0.1).defaults["foreach"], ours.BertAdam(p, lr=0.1).defaults["fused"]) == (
        False,
        False,
    )
    assert (
        hf_optim.BertAdam(p, lr=0.1).defaults["foreach"],
        hf_optim.BertAdam(p, lr=0.1).defaults["fused"],
    ) == (
        None,
        None,
    )
    assert ours._LRSchedule is ours.LRSchedule


def test_schedule_object_with_warmup_logs_the_legacy_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_optim"):
        hf_optim.BertAdam(
            [torch.zeros(2, requires_grad=True)], lr=1e-3, warmup=0.1, schedule=ours.ConstantLR(t_total=5)
        )
    assert any("ineffective" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_non_finite_element_spreads_to_its_whole_gradient_like_legacy(impl):
    # a NaN norm gives a NaN clipping coefficient, applied to the whole gradient, as clip_grad_norm_ did
    def run(cls, extra):
        params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
        opt = cls(params, lr=0.1, **extra)
        params[0].grad = torch.tensor([0.1, float("nan"), 0.2])
        params[1].grad = torch.tensor([0.1, 0.2])
        opt.step()
        return [p.detach() for p in params] + [p.grad for p in params]

    expected = run(LEGACY.BertAdam, {})
    assert expected[2].isnan().all() and not expected[3].isnan().any()
    exact = impl != "default"  # the fused kernel rounds differently
    for e, g in zip(expected, run(ours.BertAdam, IMPLS[impl]), strict=True):
        torch.testing.assert_close(g, e, equal_nan=True, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_large_clipped_gradients_on_the_default_path(monkeypatch):
    # gradients above OWN_CALL_MIN_NUMEL are clipped inside their own fused-kernel call (grad_scale)
    from hf_optim.optimizers.bert_adam import OWN_CALL_MIN_NUMEL

    shapes = [(300, 250), (OWN_CALL_MIN_NUMEL,), (40, 30), (7,)]
    scaled = []
    real = torch._fused_adamw_

    def spy(*args, **kwargs):
        scaled.append(kwargs.get("grad_scale") is not None)
        return real(*args, **kwargs)

    def run(cls, extra):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        opt = cls([{"params": params[:2]}, {"params": params[2:], "max_grad_norm": 0.5}], lr=1e-2, warmup=0.2,
                  t_total=4, **extra)  # fmt: skip
        grads = []
        for step in range(5):
            for i, p in enumerate(params):  # the second tensor's gradient is small at step 2: not clipped
                scale = 1e-4 if (i == 1 and step == 2) else 3.0
                p.grad = torch.randn(p.shape, generator=g) * scale
            opt.step()
            grads.append([p.grad.clone() for p in params])
        return params, opt, grads

    e_params, e_opt, e_grads = run(LEGACY.BertAdam, {})
    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    g_params, g_opt, g_grads = run(hf_optim.BertAdam, {})
    assert sum(scaled) == 2 * 5 - 1 and not all(scaled)
    for e, g in zip(e_params, g_params, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for e_step, g_step in zip(e_grads, g_grads, strict=True):
        for e, g in zip(e_step, g_step, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    for e_state, g_state in zip(e_opt.state.values(), g_opt.state.values(), strict=True):
        torch.testing.assert_close(g_state["next_m"], e_state["next_m"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_state["next_v"], e_state["next_v"], rtol=1e-5, atol=1e-6)
