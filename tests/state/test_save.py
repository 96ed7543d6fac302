"""save_state: round trips against the optimizers' own state_dict(), bit-exact continuation, keys, sharding."""

from __future__ import annotations

import copy
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    load_state,
    save_state,
)
from tests.state.helpers import (
    OPTIMIZERS,
    Net,
    assert_same_value,
    batches,
    big_setup,
    grouped,
    make_setup,
    snapshot,
    train,
)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_round_trip_restores_state_dict_exactly(tmp_path, name):
    model, opt, sched = make_setup(OPTIMIZERS[name])
    train(model, opt, sched, batches(1, 4))
    expected_opt, expected_sched = snapshot(opt, sched)
    save_state(tmp_path, opt, sched)
    assert sorted(os.listdir(tmp_path)) == [OPTIMIZER_NAME, SCHEDULER_NAME]

    _model2, opt2, sched2 = make_setup(OPTIMIZERS[name])
    report = load_state(tmp_path, opt2, sched2)
    assert report.complete and report.scheduler_loaded and not report.accumulator_loaded
    assert_same_value(opt2.state_dict(), expected_opt, "optimizer")
    assert_same_value(sched2.state_dict(), expected_sched, "scheduler")
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("named", [True, False])
def test_continuation_is_bit_exact(tmp_path, name, named):
    data = batches(2, 10)
    # reference: 10 uninterrupted steps
    model, opt, sched = make_setup(OPTIMIZERS[name], named=named)
    train(model, opt, sched, data)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # 4 steps, save, then a fresh process-like setup continues for 6
    model, opt, sched = make_setup(OPTIMIZERS[name], named=named)
    train(model, opt, sched, data[:4])
    weights = copy.deepcopy(model.state_dict())
    save_state(tmp_path, opt, sched)
    del model, opt, sched
    model, opt, sched = make_setup(OPTIMIZERS[name], named=named)
    model.load_state_dict(weights)
    load_state(tmp_path, opt, sched)
    train(model, opt, sched, data[4:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_continuation_mid_accumulation_is_bit_exact(tmp_path):
    data = batches(3, 12)
    factory = OPTIMIZERS["hf_adamw"]

    model, opt, sched = make_setup(factory)
    train(model, opt, sched, data, hf_optim.GradientAccumulator(), micro=3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = make_setup(factory)
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, data[:7], acc, micro=3)  # 2 optimizer steps + 1 pending micro-step
    assert acc.step == 1
    weights = copy.deepcopy(model.state_dict())
    save_state(tmp_path, opt, sched, acc)
    assert ACCUMULATOR_NAME in os.listdir(tmp_path)

    model, opt, sched = make_setup(factory)
    model.load_state_dict(weights)
    acc = hf_optim.GradientAccumulator()
    report = load_state(tmp_path, opt, sched, acc)
    assert report.accumulator_loaded and acc.step == 1
    # the first micro-step of the resumed run is index 7 of the data, i.e. micro-step 2 of 3 of that step
    for i, (x, y) in enumerate(data[7:], start=7):
        torch.nn.functional.mse_loss(model(x), y).backward()
        acc.accumulate_from(model)
        if (i + 1) % 3 == 0:
            acc.apply_to(model)
            opt.step()
            opt.zero_grad()
            sched.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_transformers_adafactor_round_trip(tmp_path):
    from transformers.optimization import Adafactor

    def factory(groups):
        return Adafactor(groups, lr=None, relative_step=True, warmup_init=True, scale_parameter=True)

    data = batches(4, 6)
    model, opt, _ = make_setup(factory, scheduler=False)
    train(model, opt, None, data)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt, _ = make_setup(factory, scheduler=False)
    train(model, opt, None, data[:3])
    expected = snapshot(opt)[0]
    assert any(isinstance(s["step"], int) for s in expected["state"].values())  # Python int counters
    weights = copy.deepcopy(model.state_dict())
    save_state(tmp_path, opt)
    model, opt, _ = make_setup(factory, scheduler=False)
    model.load_state_dict(weights)
    load_state(tmp_path, opt)
    assert_same_value(opt.state_dict(), expected, "adafactor")
    train(model, opt, None, data[3:])
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_state_is_keyed_by_parameter_name(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 1))
    save_state(tmp_path, opt)
    with safe_open(str(tmp_path / OPTIMIZER_NAME), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["hf_optim"])
    names = [n for n, _ in model.named_parameters()]
    expected = {f"state.{n}.{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    assert keys == expected
    assert meta["format"] == "hf_optim.optimizer" and meta["format_version"] == 1
    assert meta["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert [r["name"] for g in meta["param_groups"] for r in g["params"]] == [
        n for g in grouped(model) for n, _ in g["params"]
    ]
    assert meta["param_groups"][0]["hyperparameters"]["betas"] == {"tuple": [0.9, 0.999]}


def test_unnamed_parameters_are_keyed_by_index(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["sgd_momentum"], named=False)
    train(model, opt, sched, batches(1, 1))
    save_state(tmp_path, opt)
    with safe_open(str(tmp_path / OPTIMIZER_NAME), framework="pt") as f:
        assert set(f.keys()) == {f"state.{i}.momentum_buffer" for i in range(6)}


def test_registry_name_is_recorded(tmp_path):
    model = Net()
    opt = hf_optim.create_optimizer("adamw_hf", model, lr=1e-3)
    save_state(tmp_path, opt)
    info = hf_optim.inspect_state(tmp_path)
    assert info.optimizer_name == "adamw_hf"
    assert info.optimizer_class == "hf_optim.optimizers.adamw.AdamW"


def test_fresh_optimizer_without_state_round_trips(tmp_path):
    _model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    save_state(tmp_path, opt, sched)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"])
    load_state(tmp_path, opt2, sched2)
    assert opt2.state_dict()["state"] == {}


def test_sharded_save_round_trips(tmp_path):
    _model, opt, sched = big_setup()
    expected = snapshot(opt)[0]
    files = save_state(tmp_path, opt, sched, max_shard_size=600)
    index = json.loads((tmp_path / OPTIMIZER_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3
    assert shards == [f"optimizer-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.path.basename(f) for f in files) == sorted(
        [*shards, OPTIMIZER_INDEX_NAME, SCHEDULER_NAME]
    )
    assert not (tmp_path / OPTIMIZER_NAME).exists()
    total = 0
    for shard in shards:
        tensors = safetensors.torch.load_file(str(tmp_path / shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 600 or len(tensors) == 1  # a tensor larger than the limit gets a shard of its own
        assert set(tensors) == {k for k, v in index["weight_map"].items() if v == shard}
        total += size
    assert index["metadata"]["total_size"] == total
    _, opt2, sched2 = big_setup()
    load_state(tmp_path, opt2, sched2)
    assert_same_value(opt2.state_dict(), expected, "sharded")


def test_switching_between_sharded_and_single_file_removes_stale_files(tmp_path):
    model, opt, sched = big_setup()
    save_state(tmp_path, opt, sched, max_shard_size=400)
    many = len([n for n in os.listdir(tmp_path) if n.startswith("optimizer-")])
    save_state(tmp_path, opt, sched, max_shard_size=2000)
    names = sorted(os.listdir(tmp_path))
    fewer = [n for n in names if n.startswith("optimizer-")]
    assert 1 < len(fewer) < many and all(f"-of-{len(fewer):05d}" in n for n in fewer)
    train(model, opt, sched, batches(7, 1))
    expected = snapshot(opt)[0]
    save_state(tmp_path, opt)  # single file now; the scheduler is not saved this time
    assert sorted(os.listdir(tmp_path)) == [OPTIMIZER_NAME]
    _, opt2, _ = big_setup()
    load_state(tmp_path, opt2)
    assert_same_value(opt2.state_dict(), expected, "single")
    save_state(tmp_path, opt, sched, max_shard_size=1000)
    assert OPTIMIZER_NAME not in os.listdir(tmp_path)


def test_accelerate_wrappers_are_looked_through(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    model, opt, sched = accelerator.prepare(model, opt, sched)
    train(model, opt, sched, batches(11, 2))
    expected = snapshot(opt.optimizer, sched.scheduler)
    save_state(tmp_path, opt, sched)
    info = hf_optim.inspect_state(tmp_path)
    assert info.optimizer_class == "torch.optim.adamw.AdamW" and info.scheduler_name == "cosine"
    # saved from wrapped objects, loaded into plain ones (and the other way round)
    _, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"])
    load_state(tmp_path, opt2, sched2)
    assert_same_value(snapshot(opt2, sched2), expected, "plain")
    save_state(tmp_path / "plain", opt2, sched2)
    model3, opt3, sched3 = make_setup(OPTIMIZERS["torch_adamw"])
    model3, opt3, sched3 = accelerator.prepare(model3, opt3, sched3)
    load_state(tmp_path / "plain", opt3, sched3)
    assert_same_value(snapshot(opt3.optimizer, sched3.scheduler), expected, "wrapped")


def test_save_state_dict_and_load_state_dict_round_trip_torch_format(tmp_path):
    from hf_optim.state import load_state_dict, save_state_dict

    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 3))
    sd = opt.state_dict()
    save_state_dict(
        tmp_path,
        sd,
        scheduler_state=sched.state_dict(),
        max_shard_size=500,
        metadata={"origin": "test"},
    )
    got = load_state_dict(tmp_path)
    assert_same_value(got, sd, "state_dict")
    torch_opt = torch.optim.AdamW(grouped(model), lr=1.0)
    torch_opt.load_state_dict(got)  # torch itself accepts it
    assert hf_optim.inspect_state(tmp_path).info == {"origin": "test"}
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        save_state_dict(tmp_path, {"state": {}})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_state_dict(tmp_path, sd, metadata={"a": 1})
