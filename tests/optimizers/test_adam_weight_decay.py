"""hf_optim.AdamWeightDecay against TensorFlow's ops re-stated in NumPy float32.

The reference follows transformers 4.x ``AdamWeightDecay`` (optimization_tf.py) on Keras ``Adam``:
``apply_gradients`` transforms gradients (``clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm``), then per
variable ``_decay_weights_op`` (``var -= lr * var * rate``) and ``ResourceApplyAdam`` (``alpha = lr*sqrt(1-b2^t)/
(1-b1^t); m += (g-m)*(1-b1); v += (g*g-v)*(1-b2); var -= m*alpha/(sqrt(v)+eps)``) or, with amsgrad, Keras'
python ops. ``t`` is the optimizer's iteration count + 1, shared by every variable.
"""

import copy
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_optim import AdamWeightDecay
from hf_optim.param_groups import compile_patterns, decay_applies
from tests.multiprocess import end_process_group, free_port, run_workers

F32 = np.float32
NAMES = [
    "bert.embeddings.LayerNorm.weight",
    "bert.encoder.dense.weight",
    "bert.encoder.dense.bias",
    "classifier.weight",
]
SHAPES = [(6,), (5, 6), (5,), (3, 5)]


def tf_reference(init, stream, *, lrs, b1=0.9, b2=0.999, eps=1e-7, amsgrad=False, rate=0.0, include=None,
                 exclude=None, clipvalue=None, clipnorm=None, global_clipnorm=None):  # fmt: skip
    var = {n: init[n].astype(F32).copy() for n in init}
    m = {n: np.zeros_like(var[n]) for n in var}
    v = {n: np.zeros_like(var[n]) for n in var}
    vhat = {n: np.zeros_like(var[n]) for n in var}

    def do_decay(name):  # AdamWeightDecay._do_use_weight_decay
        if rate == 0:
            return False
        if include:
            for r in include:
                if re.search(r, name) is not None:
                    return True
        if exclude:
            for r in exclude:
                if re.search(r, name) is not None:
                    return False
        return True

    for step, grads in enumerate(stream):
        names = [n for n in grads if grads[n] is not None]
        gs = [grads[n].astype(F32) for n in names]
        if clipvalue is not None:
            gs = [np.clip(g, F32(-clipvalue), F32(clipvalue)) for g in gs]
        if clipnorm is not None:  # tf.clip_by_norm
            gs = [(g * F32(clipnorm)) / np.maximum(np.sqrt(np.sum(g * g)), F32(clipnorm)) for g in gs]
        if global_clipnorm is not None:  # tf.clip_by_global_norm
            norm = np.sqrt(sum(F32(2) * (np.sum(g * g) / F32(2)) for g in gs))
            scale = F32(global_clipnorm) * np.minimum(F32(1) / norm, F32(1) / F32(global_clipnorm))
            gs = [g * scale for g in gs]
        local_step = F32(step + 1)  # the optimizer's iteration count + 1
        b1_power, b2_power = np.power(F32(b1), local_step), np.power(F32(b2), local_step)
        lr_t = F32(lrs[step])
        for n, g in zip(names, gs, strict=True):
            if do_decay(n):
                var[n] = var[n] - lr_t * var[n] * F32(rate)
            if amsgrad:
                coef = lr_t * (np.sqrt(F32(1) - b2_power) / (F32(1) - b1_power))
                m[n] = m[n] * F32(b1) + g * (F32(1) - F32(b1))
                v[n] = v[n] * F32(b2) + (g * g) * (F32(1) - F32(b2))
                vhat[n] = np.maximum(vhat[n], v[n])
                var[n] = var[n] - coef * m[n] / (np.sqrt(vhat[n]) + F32(eps))
            else:
                alpha = lr_t * np.sqrt(F32(1) - b2_power) / (F32(1) - b1_power)
                m[n] = m[n] + (g - m[n]) * (F32(1) - F32(b1))
                v[n] = v[n] + (g * g - v[n]) * (F32(1) - F32(b2))
                var[n] = var[n] - (m[n] * alpha) / (np.sqrt(v[n]) + F32(eps))
    return var


def data(steps=20, skip=None, seed=0):
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s).astype(F32) for n, s in zip(NAMES, SHAPES, strict=True)}
    stream = [
        {
            n: None if skip and skip(t, n) else rng.standard_normal(s).astype(F32)
            for n, s in zip(NAMES, SHAPES, strict=True)
        }
        for t in range(steps)
    ]
    return init, stream


def run_torch(init, stream, lrs, impl, **kwargs):
    params = {n: torch.tensor(init[n], requires_grad=True) for n in NAMES}
    opt = AdamWeightDecay(list(params.items()), learning_rate=lrs[0], **kwargs, **impl)
    for step, grads in enumerate(stream):
        opt.param_groups[0]["lr"] = lrs[step]
        for n, p in params.items():
            p.grad = None if grads[n] is None else torch.tensor(grads[n])
        opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}, opt


CONFIGS = {
    "plain": {},
    "decay_all": {"weight_decay_rate": 0.1},
    "decay_exclude": {"weight_decay_rate": 0.1, "exclude_from_weight_decay": ["LayerNorm", "bias"]},
    "include_wins": {
        "weight_decay_rate": 0.1,
        "include_in_weight_decay": [r"dense\.bias"],
        "exclude_from_weight_decay": ["bias"],
    },
    "amsgrad": {"amsgrad": True, "weight_decay_rate": 0.05, "exclude_from_weight_decay": ["bias"]},
    "clipvalue": {"clipvalue": 0.5, "weight_decay_rate": 0.01},
    "clipnorm": {"clipnorm": 1.0},
    "global_clipnorm": {"global_clipnorm": 2.0, "amsgrad": True},
    "betas_eps": {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3, "weight_decay_rate": 0.2},
}
TO_REFERENCE = {
    "weight_decay_rate": "rate", "include_in_weight_decay": "include", "exclude_from_weight_decay": "exclude",
    "beta_1": "b1", "beta_2": "b2", "epsilon": "eps",
}  # fmt: skip
IMPLS = {"reference": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "default": {}}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_tensorflow_to_float32_rounding(config, impl):
    kwargs = CONFIGS[config]
    lrs = [
        1e-2 * (1 - t / 25) for t in range(20)
    ]  # a decaying schedule, as Keras' LearningRateSchedule would set
    init, stream = data()
    expected = tf_reference(init, stream, lrs=lrs, **{TO_REFERENCE.get(k, k): v for k, v in kwargs.items()})
    got, opt = run_torch(init, stream, lrs, IMPLS[impl], **kwargs)
    tol = 2e-6 if impl == "reference" else 1e-5
    for n in NAMES:
        np.testing.assert_allclose(got[n], expected[n], rtol=tol, atol=tol, err_msg=n)
    assert opt.iterations == 20


@pytest.mark.parametrize("impl", list(IMPLS))
def test_step_count_is_the_optimizers_not_the_parameters(impl):
    # Keras uses the optimizer's iteration count for bias correction, also for a variable that missed steps.
    def skip(t, n):
        return n == "classifier.weight" and t % 4 == 0

    init, stream = data(skip=skip)
    lrs = [1e-2] * 20
    expected = tf_reference(init, stream, lrs=lrs, rate=0.1)
    got, opt = run_torch(init, stream, lrs, IMPLS[impl], weight_decay_rate=0.1)
    for n in NAMES:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-5, err_msg=n)
    last = opt.param_groups[0]["params"][3]
    assert opt.state[last]["step"].item() == 20  # updated at t=20, the optimizer's 20th step


@pytest.mark.parametrize(
    ("name", "include", "exclude", "rate", "expected"),
    [
        ("encoder.dense.weight", None, None, 0.1, True),
        ("encoder.dense.weight", None, None, 0.0, False),
        ("encoder.dense.bias", None, ["bias"], 0.1, False),
        ("encoder.LayerNorm.weight", None, ["LayerNorm", "bias"], 0.1, False),
        ("encoder.dense.bias", ["dense"], ["bias"], 0.1, True),
        ("encoder.dense.bias", ["dense"], ["bias"], 0.0, False),
        ("encoder.dense.weight", ["^encoder"], None, 0.1, True),
        ("head.weight", ["^encoder"], ["weight$"], 0.1, False),
    ],
)
def test_decay_rule_table(name, include, exclude, rate, expected):
    assert (
        decay_applies(
            name,
            weight_decay=rate,
            include=compile_patterns(include, "include_in_weight_decay"),
            exclude=compile_patterns(exclude, "exclude_from_weight_decay"),
        )
        is expected
    )


def named_params():
    return [(n, torch.zeros(s, requires_grad=True)) for n, s in zip(NAMES, SHAPES, strict=True)]


def test_groups_accept_keras_names_and_schedulers_see_lr():
    params = named_params()
    opt = AdamWeightDecay(
        [
            {"params": params[:2], "learning_rate": 0.5, "weight_decay_rate": 0.3, "beta_2": 0.9},
            {"params": params[2:]},
        ],
        learning_rate=0.1,
        beta_1=0.7,
    )
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["weight_decay"], g0["betas"]) == (0.5, 0.3, (0.7, 0.9))
    assert (g1["lr"], g1["weight_decay"], g1["betas"]) == (0.1, 0.0, (0.7, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.05]
    assert sched.get_last_lr() == [0.25, 0.05]


def test_a_rate_set_after_construction_takes_effect():
    # Keras reads weight_decay_rate at each step: a group created with rate 0 and raised later is decayed then,
    # by name (the bias stays excluded).
    params = [(n, torch.ones(s, requires_grad=True)) for n, s in zip(NAMES, SHAPES, strict=True)]
    opt = AdamWeightDecay(params, learning_rate=0.1, exclude_from_weight_decay=["bias"])
    opt.param_groups[0]["weight_decay"] = 0.5
    for _, p in params:
        p.grad = torch.zeros_like(p)  # no Adam update: only the decay moves the weights
    opt.step()
    assert torch.equal(params[1][1].detach(), torch.full(SHAPES[1], 1 - 0.1 * 1 * 0.5))
    assert torch.equal(params[2][1].detach(), torch.ones(SHAPES[2]))


def test_patterns_need_names():
    with pytest.raises(ValueError, match=r"pass model.named_parameters\(\)"):
        AdamWeightDecay(
            [p for _, p in named_params()], weight_decay_rate=0.1, exclude_from_weight_decay=["bias"]
        )


def test_keras_group_and_torch_name_clash():
    with pytest.raises(ValueError, match="sets both 'learning_rate' and 'lr'"):
        AdamWeightDecay([{"params": [p for _, p in named_params()], "lr": 0.1, "learning_rate": 0.2}])


def test_apply_gradients():
    init, stream = data(steps=3)
    params = {n: torch.tensor(init[n], requires_grad=True) for n in NAMES}
    opt = AdamWeightDecay(list(params.items()), learning_rate=1e-2, weight_decay_rate=0.1)
    stale = torch.full(SHAPES[3], 100.0)
    params["classifier.weight"].grad = stale  # not in the pairs: must be ignored and left alone
    for t, grads in enumerate(stream, start=1):
        pairs = [(torch.tensor(grads[n]), params[n]) for n in NAMES[:3]] + [
            (None, params["classifier.weight"])
        ]
        assert opt.apply_gradients(pairs) == t
    assert opt.iterations == 3
    assert params["classifier.weight"].grad is stale
    np.testing.assert_array_equal(params["classifier.weight"].detach().numpy(), init["classifier.weight"])
    expected = tf_reference(
        init,
        [{n: (g[n] if n in NAMES[:3] else None) for n in NAMES} for g in stream],
        lrs=[1e-2] * 3,
        rate=0.1,
    )
    for n in NAMES[:3]:
        np.testing.assert_allclose(params[n].detach().numpy(), expected[n], rtol=1e-5, atol=1e-6)


def test_apply_gradients_bad_input():
    (n0, p0), (_, p1) = named_params()[:2]
    opt = AdamWeightDecay([(n0, p0), ("b", p1)])
    with pytest.raises(TypeError, match="iterable of"):
        opt.apply_gradients(5)
    with pytest.raises(TypeError, match="pairs"):
        opt.apply_gradients([(torch.zeros(6),)])
    with pytest.raises(TypeError, match=r"\(Tensor or None, Tensor\)"):
        opt.apply_gradients([([0.0] * 6, p0)])
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply_gradients([(None, p0), (None, p1)])
    with pytest.raises(ValueError, match="does not manage"):
        opt.apply_gradients([(torch.zeros(3), torch.zeros(3))])
    with pytest.raises(ValueError, match="gradient shape"):
        opt.apply_gradients([(torch.zeros(7), p0)])
    assert opt.iterations == 0 and not opt.state


def test_state_dict_round_trip_restores_iterations():
    # the continuation on every path is in OPTIM_DB; the Keras iteration count is this optimizer's own
    kwargs = {"weight_decay_rate": 0.1, "exclude_from_weight_decay": ["bias"], "amsgrad": True}
    init, stream = data(steps=12)
    full, _ = run_torch(init, stream, [1e-2] * 12, {}, **kwargs)

    first, opt = run_torch(init, stream[:6], [1e-2] * 6, {}, **kwargs)
    sd = copy.deepcopy(opt.state_dict())
    params = {n: torch.tensor(first[n], requires_grad=True) for n in NAMES}
    opt2 = AdamWeightDecay(list(params.items()), learning_rate=1e-2, **kwargs)
    opt2.load_state_dict(sd)
    assert opt2.iterations == 6
    for grads in stream[6:]:
        for n, p in params.items():
            p.grad = torch.tensor(grads[n])
        opt2.step()
    for n in NAMES:
        np.testing.assert_array_equal(params[n].detach().numpy(), full[n])


def test_deepcopy_keeps_the_keras_options():
    params = [(n, torch.ones(s, requires_grad=True)) for n, s in zip(NAMES, SHAPES, strict=True)]
    opt = AdamWeightDecay(params, weight_decay_rate=0.1, exclude_from_weight_decay=["bias"], clipnorm=100.0)
    clone = copy.deepcopy(opt)
    assert (clone.clipnorm, clone.exclude_from_weight_decay, clone.name) == (
        100.0,
        ["bias"],
        "AdamWeightDecay",
    )
    copied = clone.param_groups[0]["params"]
    for p in copied:
        p.grad = torch.ones_like(p)
    clone.step()
    # One step from p = 1 with g = 1: m = 0.1, v = 0.001; the bias is not decayed, the weight is.
    update = 1e-3 * np.sqrt(1 - 0.999) / (1 - 0.9) * 0.1 / (np.sqrt(0.001) + 1e-7)
    torch.testing.assert_close(copied[2].detach(), torch.full(SHAPES[2], 1 - update))
    torch.testing.assert_close(copied[1].detach(), torch.full(SHAPES[1], 1 - 1e-3 * 0.1 - update))
    assert all(torch.equal(p, torch.ones_like(p)) for _, p in params)  # the original is untouched


def _distributed_worker(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        init, stream = data(steps=3, seed=0)
        local = [{n: g[n] * (rank + 1) for n in NAMES} for g in stream]  # different gradients per process
        out = {}
        for aggregate in (True, False):
            params = {n: torch.tensor(init[n], requires_grad=True) for n in NAMES}
            opt = AdamWeightDecay(list(params.items()), learning_rate=1e-2, weight_decay_rate=0.1)
            for grads in local:
                pairs = [(torch.tensor(grads[n]), params[n]) for n in NAMES]
                opt.apply_gradients(pairs, experimental_aggregate_gradients=aggregate)
                assert torch.equal(
                    pairs[0][0], torch.tensor(grads[NAMES[0]])
                )  # the caller's tensor is untouched
            out[aggregate] = {n: p.detach().numpy().copy() for n, p in params.items()}
        results[rank] = out
    finally:
        end_process_group()


def test_apply_gradients_sums_across_two_processes():
    results = mp.Manager().dict()
    run_workers(_distributed_worker, (2, free_port(), results), 2)
    init, stream = data(steps=3, seed=0)
    summed = [{n: g[n] * F32(1) + g[n] * F32(2) for n in NAMES} for g in stream]
    expected = tf_reference(init, summed, lrs=[1e-2] * 3, rate=0.1)
    for rank in range(2):
        for n in NAMES:
            np.testing.assert_allclose(results[rank][True][n], expected[n], rtol=1e-5, atol=1e-6)
        local = tf_reference(
            init, [{n: g[n] * F32(rank + 1) for n in NAMES} for g in stream], lrs=[1e-2] * 3, rate=0.1
        )
        for n in NAMES:
            np.testing.assert_allclose(results[rank][False][n], local[n], rtol=1e-5, atol=1e-6)


def test_load_state_dict_refuses_state_it_does_not_use():
    params = named_params()
    opt = AdamWeightDecay(params, amsgrad=False)
    for _, p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    sd["state"][1]["max_exp_avg_sq"] = torch.zeros(SHAPES[1])  # only kept with amsgrad
    sd["state"][3]["next_m"] = sd["state"][3].pop("exp_avg")
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        opt.load_state_dict(sd)
    assert f"parameter '{NAMES[1]}': unexpected keys ['max_exp_avg_sq'], missing keys []" in str(info.value)
    assert f"parameter '{NAMES[3]}': unexpected keys ['next_m'], missing keys ['exp_avg']" in str(info.value)
    after = opt.state_dict()
    for i, state in before["state"].items():
        assert state.keys() == after["state"][i].keys()
        assert all(torch.equal(v, after["state"][i][k]) for k, v in state.items())
    sd["param_groups"][0]["amsgrad"] = True  # the same state under amsgrad: max_exp_avg_sq is expected
    sd["state"][3]["exp_avg"] = sd["state"][3].pop("next_m")
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["amsgrad"] is True and opt.iterations == 1
