"""hf_optim.AdamW against transformers 4.x AdamW (a verbatim copy) and against the formulas written out in float64."""

import copy
import math

import pytest
import torch

from hf_optim import AdamW
from hf_optim.optimizers import adamw
from tests.optimizers.legacy_transformers_adamw import LegacyAdamW

OPTIONS = [
    {"correct_bias": True, "weight_decay": 0.0},
    {"correct_bias": True, "weight_decay": 0.05},
    {"correct_bias": False, "weight_decay": 0.0},
    {"correct_bias": False, "weight_decay": 0.05},
]
IMPLS = {"reference": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "default": {}}


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 9), (9,), (4, 3, 5), (1,)]
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]


def run(opt_factory, steps=30, *, dtype=torch.float32, layout="flat", skip=None, lrs=None):
    """Train copies of the same parameters on the same gradient stream; ``skip(step, i)`` leaves a grad out."""
    params = make_params(dtype)
    if layout == "flat":
        opt = opt_factory(params)
    elif layout == "groups":
        opt = opt_factory(
            [
                {"params": params[:2]},
                {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
            ]
        )
    else:  # named
        opt = opt_factory([(f"layer{i}.weight", p) for i, p in enumerate(params)])
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(dtype)
            p.grad = None if skip and skip(step, i) else grad
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("layout", ["flat", "groups", "named"])
def test_reference_path_is_bit_for_bit_legacy(options, layout):
    kw = {"lr": 1e-2, "eps": 1e-6, **options}
    expected, legacy = run(lambda p: LegacyAdamW(p, **kw), layout=layout)
    got, opt = run(lambda p: AdamW(p, **kw, foreach=False, fused=False), layout=layout)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    for p_legacy, p_new in zip(legacy.state.values(), opt.state.values(), strict=True):
        assert torch.equal(p_legacy["exp_avg"], p_new["exp_avg"])
        assert torch.equal(p_legacy["exp_avg_sq"], p_new["exp_avg_sq"])
        assert p_new["step"].item() == p_legacy["step"] == 30


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_foreach_path_matches_legacy_exactly_on_cpu(options):
    kw = {"lr": 1e-2, **options}
    expected, _ = run(lambda p: LegacyAdamW(p, **kw), layout="groups")
    got, _ = run(lambda p: AdamW(p, **kw, foreach=True), layout="groups")
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.parametrize(
    "options", [*OPTIONS, {"correct_bias": False, "weight_decay": 0.3, "eps": 0.0}], ids=str
)
def test_default_fused_path_agrees_with_legacy(options):
    # two groups, the second with its own lr, decay and betas: the fused path splits its calls by group
    kw = {"lr": 1e-2, **options}
    expected, _ = run(lambda p: LegacyAdamW(p, **kw), layout="groups")
    got, opt = run(lambda p: AdamW(p, **kw), layout="groups")
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert all(s["step"].item() == 30 for s in opt.state.values())


def test_default_path_with_a_schedule_and_parameters_at_different_steps():
    # Parameter 1 misses every third gradient, so its step count lags: the fused path splits by step value.
    def skip(step, i):
        return i == 1 and step % 3 == 0

    lrs = [1e-2 * (1 - s / 40) for s in range(30)]
    expected, legacy = run(lambda p: LegacyAdamW(p, lr=1e-2, weight_decay=0.1), skip=skip, lrs=lrs)
    got, opt = run(lambda p: AdamW(p, lr=1e-2, weight_decay=0.1), skip=skip, lrs=lrs)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    params, legacy_params = opt.param_groups[0]["params"], legacy.param_groups[0]["params"]
    assert [opt.state[p]["step"].item() for p in params] == [legacy.state[p]["step"] for p in legacy_params]
    assert opt.state[params[1]]["step"].item() == 20


def test_formula_written_out_in_float64():
    # The formulas, per parameter, step t, in float64 on plain Python lists.
    lr, b1, b2, eps, wd = 0.05, 0.8, 0.95, 1e-3, 0.1
    p0 = [0.5, -1.25, 2.0]
    grads = [[0.1, -0.2, 0.3], [0.4, 0.0, -0.1], [-0.3, 0.2, 0.25]]
    for correct_bias in (True, False):
        p, m, v = list(p0), [0.0] * 3, [0.0] * 3
        for t, g in enumerate(grads, start=1):
            for i in range(3):
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
                denom = math.sqrt(v[i]) + eps
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
                p[i] -= step_size * m[i] / denom
                p[i] -= lr * wd * p[i]
        for impl in IMPLS.values():
            param = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
            opt = AdamW(
                [param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, correct_bias=correct_bias, **impl
            )
            for g in grads:
                param.grad = torch.tensor(g, dtype=torch.float64)
                opt.step()
            torch.testing.assert_close(
                param.detach(), torch.tensor(p, dtype=torch.float64), rtol=1e-12, atol=1e-12
            )


def test_is_a_torch_adamw_with_the_legacy_state_keys():
    params = make_params()
    opt = AdamW(params)
    assert isinstance(opt, torch.optim.AdamW)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].dtype == torch.float32 and state["step"].item() == 1
    assert opt.defaults == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
        "correct_bias": True,
        "foreach": None,
        "fused": None,
        "capturable": False,
        "amsgrad": False,
        "maximize": False,
        "differentiable": False,
        "decoupled_weight_decay": True,
    }


@pytest.mark.parametrize("impl", list(IMPLS))
def test_loads_a_transformers_4_state_dict_and_continues_identically(impl):
    kw = {"lr": 1e-2, "weight_decay": 0.01, "correct_bias": False}
    params = make_params()
    legacy = LegacyAdamW(params, **kw)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(20)]
    for step_grads in grads[:10]:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr
        legacy.step()
    legacy_sd = copy.deepcopy(legacy.state_dict())
    assert isinstance(legacy_sd["state"][0]["step"], int)
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamW(resumed, **IMPLS[impl])
    opt.load_state_dict(legacy_sd)
    assert opt.param_groups[0]["correct_bias"] is False and opt.param_groups[0]["lr"] == 1e-2
    for step_grads in grads[10:]:
        for p, q, gr in zip(params, resumed, step_grads, strict=True):
            p.grad, q.grad = gr, gr.clone()
        legacy.step()
        opt.step()
    for p, q in zip(params, resumed, strict=True):
        if impl == "default":
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_keep_state_in_their_dtype(dtype):
    kw = {"lr": 1e-2, "weight_decay": 0.01}
    expected, _ = run(lambda p: LegacyAdamW(p, **kw), steps=10, dtype=dtype)
    reference, opt_ref = run(lambda p: AdamW(p, **kw, foreach=False, fused=False), steps=10, dtype=dtype)
    fast, opt = run(lambda p: AdamW(p, **kw), steps=10, dtype=dtype)
    for e, r, f in zip(expected, reference, fast, strict=True):
        assert torch.equal(e, r)
        assert f.dtype == dtype
        torch.testing.assert_close(f.float(), e.float(), rtol=2e-2, atol=2e-2)
    for state in [*opt.state.values(), *opt_ref.state.values()]:
        assert state["exp_avg"].dtype == dtype and state["exp_avg_sq"].dtype == dtype


def test_decay_factor_zero_takes_the_exact_path():
    # lr * weight_decay == 1 zeroes the weights after the update; the fused kernel cannot express it.
    expected, _ = run(lambda p: LegacyAdamW(p, lr=0.5, weight_decay=2.0), steps=3)
    got, _ = run(lambda p: AdamW(p, lr=0.5, weight_decay=2.0), steps=3)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
        assert not g.any()


def test_functional_api_matches_the_class():
    params = make_params()
    copies = [p.detach().clone() for p in params]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, correct_bias=False, foreach=False, fused=False)
    m = [torch.zeros_like(p) for p in copies]
    v = [torch.zeros_like(p) for p in copies]
    steps = [torch.tensor(0.0) for _ in copies]
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        opt.step()
        adamw(copies, grads, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1,
              correct_bias=False, foreach=False, fused=False)  # fmt: skip
    for p, c in zip(params, copies, strict=True):
        assert torch.equal(p.detach(), c)
    assert [s.item() for s in steps] == [5.0] * len(steps)


def test_closure_and_lr_scheduler_work():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bad_hyperparameter_in_a_param_group():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be finite"):
        AdamW([{"params": params[:2]}, {"params": params[2:], "lr": -1.0}])


def test_mixing_named_and_unnamed_parameters():
    params = make_params()
    with pytest.raises(ValueError, match="with/without names"):
        AdamW([("a", params[0]), params[1]])
    with pytest.raises(ValueError, match="with/without names"):
        AdamW([{"params": [("a", params[0])]}, {"params": [params[1]]}])


# --- the torch.optim.AdamW contract ---


def test_param_groups_carry_every_torch_adamw_key_with_the_legacy_values():
    params = make_params()
    torch_group = torch.optim.AdamW(make_params()).param_groups[0]
    group = AdamW(params, lr=1e-2, foreach=True).param_groups[0]
    assert set(torch_group) <= set(group)
    assert set(group) - set(torch_group) == {"correct_bias"}
    assert {k: group[k] for k in ("amsgrad", "maximize", "capturable", "differentiable")} == dict.fromkeys(
        ("amsgrad", "maximize", "capturable", "differentiable"), False
    )
    assert group["decoupled_weight_decay"] is True
    assert (group["foreach"], group["fused"]) == (True, None)


def test_a_torch_optimizer_built_from_its_param_groups_runs_torch_adamw():
    # What a consumer of the torch contract does (accelerate hands `optimizer.param_groups` to DeepSpeedCPUAdam):
    # build another optimizer from the groups, which reads torch's keys. torch's AdamW must accept them and run
    # exactly as one given the same options explicitly.
    params, twins = make_params(), make_params()
    groups = AdamW(params, lr=1e-2, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, foreach=False).param_groups
    rebuilt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "correct_bias"} for g in groups])
    explicit = torch.optim.AdamW(twins, lr=1e-2, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        rebuilt.step()
        explicit.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


def test_torch_adamw_setstate_keeps_the_options():
    # torch's Adam.__setstate__ fills missing keys with torch's values (decoupled_weight_decay=False for Adam);
    # with every key present, it changes nothing.
    opt = AdamW(make_params(), weight_decay=0.1)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    torch.optim.Adam.__setstate__(opt, opt.__getstate__())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before


def test_what_accelerate_does_under_deepspeed_zero_offload(monkeypatch):
    # accelerate.Accelerator.prepare, with ZeRO-Offload configured, replaces a client optimizer by DeepSpeedCPUAdam
    # (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed), in AdamW mode only for a torch.optim.AdamW.
    # DeepSpeed is not installed here: a stand-in records what accelerate's real function passes it.
    import sys
    import types

    accelerate_deepspeed = pytest.importorskip("accelerate.utils.deepspeed")
    built = {}

    class DeepSpeedCPUAdam:
        def __init__(self, param_groups, **kwargs):
            built.update(param_groups=param_groups, **kwargs)

    adam = types.ModuleType("deepspeed.ops.adam")
    adam.DeepSpeedCPUAdam = DeepSpeedCPUAdam
    for name, module in {
        "deepspeed": types.ModuleType("deepspeed"),
        "deepspeed.ops": types.ModuleType("deepspeed.ops"),
        "deepspeed.ops.adam": adam,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(accelerate_deepspeed, "compare_versions", lambda *a, **k: a[2] == "0.3.1")
    opt = AdamW(make_params(), lr=2e-5, weight_decay=0.01, correct_bias=False)
    assert isinstance(accelerate_deepspeed.map_pytorch_optim_to_deepspeed(opt), DeepSpeedCPUAdam)
    assert built["adamw_mode"] is True  # decoupled decay, torch's AdamW formula: not the legacy one
    assert (built["lr"], built["weight_decay"]) == (2e-5, 0.01)
    assert (
        built["param_groups"] is opt.param_groups
    )  # with correct_bias=False, which DeepSpeedCPUAdam ignores
    assert type(opt) is not torch.optim.AdamW  # DeepSpeed's ZeRO "supported optimizer" check compares type()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"amsgrad": True}, ValueError, r"amsgrad=True would change the algorithm.*use torch.optim.AdamW"),
        ({"maximize": True}, ValueError, "maximize=True would change the algorithm"),
        ({"differentiable": True}, ValueError, "differentiable=True"),
        ({"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
    ],
)
def test_options_that_would_change_the_math_are_refused_in_a_group_too(kwargs, error, message):
    params = make_params()
    opt = AdamW(params[:2])
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": params[2:], **kwargs})
    assert len(opt.param_groups) == 1  # the refused group was not added
    opt.add_param_group({"params": params[2:]})


# --- load_state_dict refuses state it does not use ---


def bert_adam_style_state_dict(params):
    # pytorch-pretrained-bert BertAdam keeps next_m / next_v (and no step) per parameter
    return {
        "state": {
            i: {"next_m": torch.zeros_like(p), "next_v": torch.zeros_like(p)} for i, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": 1e-3,
                "b1": 0.9,
                "b2": 0.999,
                "e": 1e-6,
                "weight_decay": 0.01,
                "params": list(range(len(params))),
            }
        ],
    }


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


@pytest.mark.parametrize("stepped", [False, True])
def test_a_bert_adam_state_dict_is_refused_naming_the_keys(stepped):
    params = make_params()
    opt = AdamW([(f"layer{i}.weight", p) for i, p in enumerate(params)], lr=1e-2)
    if stepped:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"nothing was loaded") as info:
        opt.load_state_dict(bert_adam_style_state_dict(params))
    message = str(info.value)
    assert "unexpected keys ['next_m', 'next_v'], missing keys ['exp_avg', 'exp_avg_sq', 'step']" in message
    assert "parameter #0" in message and "parameter #3" in message
    assert_same_state(snapshot(opt), before)
    opt.step()  # still usable


def test_a_moment_of_the_wrong_shape_is_refused():
    params = make_params()
    opt = AdamW(params)
    sd = {
        "state": {0: {"step": 3, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(17, 9)}},
        "param_groups": [{**opt.defaults, "params": [0, 1, 2, 3]}],
    }
    with pytest.raises(
        ValueError, match=r"parameter #0: 'exp_avg' has shape \(2,\), the parameter \(17, 9\)"
    ):
        opt.load_state_dict(sd)
    assert not opt.state


def test_a_torch_adamw_state_dict_loads_unless_its_options_change_the_math():
    params = make_params()
    torch_opt = torch.optim.AdamW(make_params(), lr=1e-2)
    for p in torch_opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    opt = AdamW(params)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert opt.param_groups[0]["correct_bias"] is True and opt.param_groups[0]["lr"] == 1e-2
    assert opt.state[params[0]]["step"].item() == 1

    amsgrad = torch.optim.AdamW(make_params(), amsgrad=True).state_dict()
    fresh = AdamW(make_params())
    with pytest.raises(ValueError, match="amsgrad=True would change the algorithm"):
        fresh.load_state_dict(amsgrad)
    assert fresh.param_groups[0]["amsgrad"] is False


def test_a_pre_hook_may_convert_a_foreign_state_dict_first():
    params = make_params()
    opt = AdamW(params)

    def convert(optimizer, state_dict):
        for s in state_dict["state"].values():
            s["exp_avg"], s["exp_avg_sq"], s["step"] = s.pop("next_m"), s.pop("next_v"), 5
        return state_dict

    opt.register_load_state_dict_pre_hook(convert)
    opt.load_state_dict(bert_adam_style_state_dict(params))
    assert opt.state[params[2]]["step"].item() == 5


def test_a_step_that_is_not_a_number_is_refused():
    params = make_params()
    opt = AdamW(params)
    sd = {
        "state": {1: {"step": "3", "exp_avg": torch.zeros(9), "exp_avg_sq": torch.zeros(9)}},
        "param_groups": [{**opt.defaults, "params": [0, 1, 2, 3]}],
    }
    with pytest.raises(ValueError, match="parameter #1: 'step' must be a number or a one-element tensor"):
        opt.load_state_dict(sd)
    assert not opt.state
