"""save_state / load_state: safetensors compatibility, exact round trips, bit-exact continuation, sharding,
validation errors that leave everything untouched, and atomic saves.

References: the ``safetensors`` library itself (reads our files, writes files we read), the optimizers' own
``state_dict()`` before saving, and uninterrupted training runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim.state import atomic, parse_max_shard_size
from hf_optim.state.io import open_file, read_safetensors, read_tensors, write_safetensors
from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    has_state,
    load_state,
    save_state,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 8, extra: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(4, hidden, dtype=dtype)
        self.norm = torch.nn.LayerNorm(hidden, dtype=dtype)
        self.head = torch.nn.Linear(hidden, 3, dtype=dtype)
        if extra:
            self.extra = torch.nn.Linear(3, 3, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.tanh(self.norm(self.encoder(x))))
        return self.extra(out) if hasattr(self, "extra") else out


def grouped(model: torch.nn.Module, named: bool = True) -> list[dict]:
    """Two groups, decay / no decay (biases and norm weights), like Trainer builds them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        item = (name, p) if named else p
        (no_decay if name.endswith("bias") or name.startswith("norm") else decay).append(item)
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def batches(seed: int, n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)) for _ in range(n)
    ]


def train(model, optimizer, scheduler, data, accumulator=None, micro: int = 1) -> None:
    for i, (x, y) in enumerate(data):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if accumulator is not None:
            accumulator.accumulate_from(model)
            if (i + 1) % micro:
                continue
            accumulator.apply_to(model)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same_value(a, b, where="") -> None:
    """Equal values with equal types; tensors bit-equal with equal dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_value(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_value(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(*objects) -> list:
    return [copy.deepcopy(o.state_dict()) for o in objects if o is not None]


def make_setup(opt_factory, *, named=True, scheduler=True, hidden=8, extra=False, dtype=torch.float32):
    torch.manual_seed(0)
    model = Net(hidden, extra, dtype)
    optimizer = opt_factory(grouped(model, named))
    sched = (
        hf_optim.get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=20)
        if scheduler
        else None
    )
    return model, optimizer, sched


OPTIMIZERS = {
    "torch_adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "torch_adamw_amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True),
    "hf_adamw": lambda groups: hf_optim.AdamW(groups, lr=1e-2, correct_bias=False),
    "adam_weight_decay": lambda groups: hf_optim.AdamWeightDecay(groups, learning_rate=1e-2),
}


# ---------------------------------------------------------------------------------------------------------------
# the file format against the safetensors library
# ---------------------------------------------------------------------------------------------------------------


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, generator=g)
    return {
        "f32": base,
        "f64": base.double() * 1e-200,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 1]),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # not contiguous
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def test_writer_output_is_read_by_safetensors(tmp_path):
    tensors = sample_tensors()
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, tensors, {"format": "pt", "k": "v ü"}, fsync=True)
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert_same_value(loaded[k].contiguous(), t.contiguous(), k)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v ü"}
    assert os.path.getsize(path) % 8 == (8 + sum(t.numel() * t.element_size() for t in tensors.values())) % 8


def test_reader_reads_files_written_by_safetensors(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = str(tmp_path / "y.safetensors")
    safetensors.torch.save_file(tensors, path, metadata={"a": "b"})
    f = open_file(path, roots=[str(tmp_path)])
    st = read_safetensors(f)
    assert st.metadata == {"a": "b"}
    loaded = read_tensors(st, st.entries)
    f.close()
    for k, t in tensors.items():
        assert_same_value(loaded[k], t, k)


# ---------------------------------------------------------------------------------------------------------------
# round trips and bit-exact continuation
# ---------------------------------------------------------------------------------------------------------------


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


class OddState(torch.optim.Optimizer):
    """Stores Python numbers, None, nested containers and a state dtype that differs from the parameter's."""

    def __init__(self, params, **defaults):
        super().__init__(params, {"lr": 0.5, **defaults})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(
                        count=0,
                        scale=0.1,
                        flag=True,
                        nothing=None,
                        hist=[1, 2.5, (3, None)],
                        buf32=torch.zeros_like(p, dtype=torch.float32),
                        big=2**70,
                    )
                st["count"] += 1
                st["scale"] *= 1.1
                st["buf32"].add_(p.grad.float())
                p.sub_((group["lr"] * st["buf32"]).to(p.dtype))


def test_exotic_values_round_trip_with_their_python_types(tmp_path):
    model = Net(dtype=torch.bfloat16)

    def named(module):
        return [(f"{module}.{n}", p) for n, p in getattr(model, module).named_parameters()]

    groups = [
        {
            "params": named("encoder"),
            "lr": torch.tensor(0.25),
            "betas": (0.9, 0.99),
            "weird": [
                float("nan"),
                float("inf"),
                -float("inf"),
                0.1 + 0.2,
                1e-300,
                5e-324,
                None,
                "s",
                True,
                7,
            ],
            "nested": {"a": (1, [2.0]), 3: "int key"},
        },
        {
            "params": named("head") + named("norm"),
            "lr": 0.125,
            "betas": (0.5, 0.25),
            "weird": [],
            "nested": {},
        },
    ]
    opt = OddState(groups)
    for x, y in batches(5, 2, torch.bfloat16):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    expected = snapshot(opt)[0]
    save_state(tmp_path, opt)
    opt2 = OddState(
        [
            {"params": named("encoder"), "lr": 0.0, "betas": (0.0, 0.0), "weird": None, "nested": None},
            {
                "params": named("head") + named("norm"),
                "lr": 0.0,
                "betas": (0.0, 0.0),
                "weird": None,
                "nested": None,
            },
        ]
    )
    load_state(tmp_path, opt2)
    got = opt2.state_dict()
    assert_same_value(got, expected, "odd")
    # the float32 buffers of bfloat16 parameters keep float32 (torch alone would cast them to bfloat16)
    assert all(s["buf32"].dtype == torch.float32 for s in got["state"].values())
    assert isinstance(got["state"][0]["count"], int) and isinstance(got["state"][0]["scale"], float)


class TensorKeyed(torch.optim.Optimizer):
    """Keeps its buffer under the state key "tensor" and has a hyperparameter "tensor"."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.5, "tensor": 1.0})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("tensor", torch.zeros_like(p))
                buf.add_(p.grad * group["tensor"])
                p.sub_(group["lr"] * buf)


def test_parameter_state_key_and_hyperparameter_named_tensor_round_trip(tmp_path):
    """'tensor' is also the tag of a tensor reference in the metadata: as a name it must not be taken for one."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tensor = torch.nn.Parameter(torch.randn(3))
            self.other = torch.nn.Parameter(torch.randn(2))

    def optimizers(model):
        named = dict(model.named_parameters())
        groups = [
            {"params": [("tensor", named["tensor"])], "tensor": 0.25},
            {"params": [("other", named["other"])], "tensor": torch.tensor([2.0, 3.0])},
        ]
        return [
            TensorKeyed(groups),
            torch.optim.AdamW([{**g, "tensor": 0.5} for g in groups], lr=0.1),
        ]

    torch.manual_seed(0)
    model = Model()
    for i, opt in enumerate(optimizers(model)):
        model.tensor.grad = torch.ones(3)
        model.other.grad = torch.ones(2)
        opt.step()
        expected = snapshot(opt)[0]
        save_state(tmp_path / str(i), opt)
        assert has_state(tmp_path / str(i))
        with safe_open(str(tmp_path / str(i) / OPTIMIZER_NAME), framework="pt") as f:
            assert "state.tensor." + ("tensor" if i == 0 else "exp_avg") in set(f.keys())
        fresh = optimizers(model)[i]
        load_state(tmp_path / str(i), fresh)
        assert_same_value(fresh.state_dict(), expected, type(opt).__name__)
        assert hf_optim.inspect_state(tmp_path / str(i)).param_groups[0]["hyperparameters"]["tensor"] == (
            0.25 if i == 0 else 0.5
        )


def test_unsupported_state_value_names_parameter_and_key(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    opt.state[model.head.weight]["callback"] = object()
    with pytest.raises(ValueError, match=r"head\.weight.*'callback'"):
        save_state(tmp_path, opt)
    assert not os.path.exists(tmp_path / OPTIMIZER_NAME)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_fresh_optimizer_without_state_round_trips(tmp_path):
    _model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    save_state(tmp_path, opt, sched)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"])
    load_state(tmp_path, opt2, sched2)
    assert opt2.state_dict()["state"] == {}


def test_no_pickle_is_used_when_loading(tmp_path, monkeypatch):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched, hf_optim.GradientAccumulator())

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["hf_adamw"])
    load_state(tmp_path, opt2, sched2, hf_optim.GradientAccumulator())


def test_has_state(tmp_path):
    assert not has_state(tmp_path)
    _model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    save_state(tmp_path, opt, sched)
    assert has_state(tmp_path)
    (tmp_path / SCHEDULER_NAME).write_text("{}")
    assert not has_state(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------------------


def big_setup(hidden=64):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"], hidden=hidden)
    train(model, opt, sched, batches(6, 2))
    return model, opt, sched


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


@pytest.mark.parametrize("bad", [0, -5, "5XB", "GB", True, 1.5])
def test_max_shard_size_is_validated(tmp_path, bad):
    _model, opt, _ = make_setup(OPTIMIZERS["torch_adamw"])
    with pytest.raises(ValueError, match="max_shard_size"):
        save_state(tmp_path, opt, max_shard_size=bad)


def test_max_shard_size_units():
    assert parse_max_shard_size("5GB") == 5 * 10**9
    assert parse_max_shard_size("500MB") == 500 * 10**6
    assert parse_max_shard_size("2GiB") == 2 * 2**30
    assert parse_max_shard_size("1.5kb") == 1500
    assert parse_max_shard_size(1234) == 1234


# ---------------------------------------------------------------------------------------------------------------
# errors leave optimizer, scheduler and accumulator untouched
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A checkpoint (optimizer + scheduler + accumulator, named params) and a trained target to load into."""
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, batches(8, 5), acc, micro=2)
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"


def target(**kwargs):
    """A trained optimizer / scheduler / accumulator, different from the saved ones."""
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"], **kwargs)
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, batches(9, 3, kwargs.get("dtype", torch.float32)), acc, micro=2)
    return model, opt, sched, acc


def assert_load_fails_unchanged(ckpt, objs, match, exc=ValueError, **kwargs):
    _model, opt, sched, acc = objs
    before = snapshot(opt, sched, acc)
    lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises(exc, match=match):
        load_state(ckpt, opt, sched, acc, **kwargs)
    for b, a in zip(before, snapshot(opt, sched, acc), strict=True):
        assert_same_value(a, b, "after failed load")
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_shape_mismatch_names_parameter(saved):
    assert_load_fails_unchanged(saved, target(hidden=5), r"encoder\.weight.*shape")


def test_missing_parameter_is_named(saved):
    assert_load_fails_unchanged(saved, target(extra=True), r"missing from the checkpoint: 'extra\.weight'")


def test_unexpected_parameter_is_named(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"], extra=True)
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched)
    model2, opt2, sched2 = make_setup(OPTIMIZERS["hf_adamw"])
    train(model2, opt2, sched2, batches(1, 2))
    assert_load_fails_unchanged(tmp_path, (model2, opt2, sched2, None), r"does not have: 'extra\.weight'")


def test_group_count_mismatch(saved):
    model, _opt, _sched, _acc = target()
    torch.manual_seed(0)
    opt1 = hf_optim.AdamW(Net().named_parameters(), lr=1e-2)
    assert_load_fails_unchanged(saved, (model, opt1, None, None), r"2 parameter group\(s\), the optimizer 1")


def test_dtype_mismatch(saved):
    assert_load_fails_unchanged(saved, target(dtype=torch.float64), r"encoder\.weight.*float32.*float64")


def test_optimizer_class_mismatch(saved):
    model, _opt, _sched, _acc = target()
    sgd = torch.optim.SGD(grouped(model), lr=0.1)
    assert_load_fails_unchanged(saved, (model, sgd, None, None), "saved from hf_optim.optimizers.adamw.AdamW")


def test_scheduler_mismatch(saved):
    model, opt, _sched, acc = target()
    other = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    assert_load_fails_unchanged(
        saved, (model, opt, other, acc), "schedule 'cosine' but the scheduler is 'linear'"
    )


def test_accumulator_gradient_count_mismatch(saved):
    model, opt, sched, _acc = target()
    acc2 = hf_optim.GradientAccumulator()
    acc2([torch.ones(2)])
    assert_load_fails_unchanged(saved, (model, opt, sched, acc2), "accumulator.safetensors has 6 gradients")


def test_missing_scheduler_file_in_checkpoint(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt)
    objs = target()
    assert_load_fails_unchanged(tmp_path, objs, "no scheduler.json")


def test_truncated_file(saved):
    path = saved / OPTIMIZER_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert_load_fails_unchanged(
        saved, target(), r"optimizer\.safetensors.*truncated or corrupted", CheckpointError
    )


def test_truncated_accumulator_file(saved):
    path = saved / ACCUMULATOR_NAME
    path.write_bytes(path.read_bytes()[:-4])
    assert_load_fails_unchanged(saved, target(), r"accumulator\.safetensors.*truncated", CheckpointError)


def test_corrupted_header(saved):
    path = saved / OPTIMIZER_NAME
    data = bytearray(path.read_bytes())
    data[12:20] = b"\xff\xfe{{{{{{"
    path.write_bytes(bytes(data))
    assert_load_fails_unchanged(saved, target(), r"optimizer\.safetensors", CheckpointError)


def test_corrupted_scheduler_json(saved):
    path = saved / SCHEDULER_NAME
    path.write_text(path.read_text()[:50])
    assert_load_fails_unchanged(saved, target(), r"scheduler\.json.*truncated or corrupted", CheckpointError)


def rewrite_metadata(path, change):
    """Rewrite a safetensors file's hf_optim metadata with the safetensors library."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    meta = json.loads(md["hf_optim"])
    change(meta)
    md["hf_optim"] = json.dumps(meta)
    safetensors.torch.save_file(tensors, str(path), metadata=md)


def test_unknown_format_version(saved):
    rewrite_metadata(saved / OPTIMIZER_NAME, lambda m: m.update(format_version=2))
    assert_load_fails_unchanged(saved, target(), "unknown format version 2", CheckpointError)


def test_not_an_hf_optim_file(saved):
    path = saved / OPTIMIZER_NAME
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path))
    assert_load_fails_unchanged(saved, target(), "not an hf_optim state file", CheckpointError)


def test_metadata_that_disagrees_with_tensors(saved):
    def change(meta):
        node = meta["state"]["encoder.weight"]["exp_avg"]
        node["shape"] = [1, 2]

    rewrite_metadata(saved / OPTIMIZER_NAME, change)
    assert_load_fails_unchanged(saved, target(), r"state\.encoder\.weight\.exp_avg", CheckpointError)


def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            _set(("state", "encoder.weight", "exp_avg", "shape"), 3),
            "tensor 'state.encoder.weight.exp_avg' has a malformed shape 3",
        ),
        (
            _set(("state", "encoder.weight", "exp_avg", "tensor"), ["x"]),
            r"tensor \['x'\] is listed in the metadata but is not",
        ),
        (_set(("state", "encoder.weight", "exp_avg", "python"), "int"), "cannot hold a Python 'int'"),
        (_set(("state", "encoder.weight"), [1]), r"the state of parameter 'encoder.weight' is \[1\]"),
        (
            _set(("param_groups", 0, "params", 0, "shape"), "abc"),
            "parameter 'encoder.weight' has a malformed shape",
        ),
        (_set(("optimizer",), "x"), "'optimizer' is 'x'"),
        (_set(("extra",), [1]), r"'extra' is \[1\], not an object"),
        (_set(("files",), ["scheduler.json"]), r"'files' is \['scheduler.json'\], not an object"),
    ],
    ids=[
        "shape-int",
        "tensor-key-list",
        "python-on-float32",
        "state-list",
        "param-shape-str",
        "optimizer-str",
        "extra-list",
        "files-list",
    ],
)
def test_malformed_metadata_is_a_checkpoint_error_naming_the_file(saved, change, match):
    rewrite_metadata(saved / OPTIMIZER_NAME, change)
    match = r"optimizer\.safetensors: (malformed metadata: )?.*" + match
    assert_load_fails_unchanged(saved, target(), match, CheckpointError)
    assert not has_state(saved)
    with pytest.raises(CheckpointError, match=match):
        hf_optim.inspect_state(saved)


def test_malformed_index_and_scheduler_json_are_checkpoint_errors(tmp_path, saved):
    path = saved / SCHEDULER_NAME
    doc = json.loads(path.read_text())
    doc["state_dict"]["dict"]["last_epoch"] = {"tensor": "x", "dtype": "int64", "shape": []}
    path.write_text(json.dumps(doc))
    match = r"scheduler\.json: tensor 'x' is not in the file"
    assert_load_fails_unchanged(saved, target(), match, CheckpointError)
    with pytest.raises(CheckpointError, match=match):
        hf_optim.inspect_state(saved)
    doc["state_dict"] = [1]
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"scheduler\.json: state_dict is not a dictionary"):
        hf_optim.inspect_state(saved)

    model, opt, sched = big_setup()
    save_state(tmp_path / "sharded", opt, sched, max_shard_size=600)
    index_path = tmp_path / "sharded" / OPTIMIZER_INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = ["optimizer-00001-of-00002.safetensors"]
    index_path.write_text(json.dumps(index))
    match = r"optimizer\.safetensors\.index\.json: shard name \['optimizer-00001"
    assert_load_fails_unchanged(tmp_path / "sharded", (model, *big_setup()[1:], None), match, CheckpointError)
    assert not has_state(tmp_path / "sharded")
    index_path.write_text(json.dumps(index)[:-10])
    match = r"sharded/optimizer\.safetensors\.index\.json is truncated or corrupted"
    assert_load_fails_unchanged(tmp_path / "sharded", (model, *big_setup()[1:], None), match, CheckpointError)
    assert not has_state(tmp_path / "sharded")


def test_scheduler_json_must_record_the_checkpoint_id(saved):
    """The id companion() matched is, for a JSON document with a "weight_map", the one under "metadata"."""
    path = saved / SCHEDULER_NAME
    doc = json.loads(path.read_text())
    checkpoint_id = doc["checkpoint_id"]
    doc.update(checkpoint_id="0" * 32, weight_map={}, metadata={"hf_optim": {"checkpoint_id": checkpoint_id}})
    path.write_text(json.dumps(doc))
    assert_load_fails_unchanged(saved, target(), f"records checkpoint id '{'0' * 32}', not", CheckpointError)


def test_inspect_skips_step_counters_that_are_not_real_numbers(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 3))
    save_state(tmp_path, opt)
    path = tmp_path / OPTIMIZER_NAME
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    tensors["state.head.bias.step"] = torch.tensor(1 + 2j, dtype=torch.complex64)
    meta = json.loads(md["hf_optim"])
    meta["state"]["head.bias"]["step"]["dtype"] = "complex64"
    md["hf_optim"] = json.dumps(meta)
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert hf_optim.inspect_state(tmp_path).step == (min(steps), max(steps)) == (3.0, 3.0)


def test_files_from_different_saves_are_refused(tmp_path, saved):
    _model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    save_state(tmp_path / "other", opt, sched)
    os.replace(tmp_path / "other" / SCHEDULER_NAME, saved / SCHEDULER_NAME)
    assert_load_fails_unchanged(saved, target(), "different checkpoint id", CheckpointError)


def test_missing_shard_and_escaping_index(tmp_path):
    model, opt, sched = big_setup()
    save_state(tmp_path, opt, sched, max_shard_size=600)
    index_path = tmp_path / OPTIMIZER_INDEX_NAME
    index = json.loads(index_path.read_text())
    objs = (model, *big_setup()[1:], None)

    bad = copy.deepcopy(index)
    key = next(iter(bad["weight_map"]))
    bad["weight_map"][key] = "../outside.safetensors"
    index_path.write_text(json.dumps(bad))
    assert_load_fails_unchanged(tmp_path, objs, "would leave the checkpoint directory", CheckpointError)
    bad["weight_map"][key] = "/etc/passwd"
    index_path.write_text(json.dumps(bad))
    assert_load_fails_unchanged(tmp_path, objs, "would leave the checkpoint directory", CheckpointError)

    index_path.write_text(json.dumps(index))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    assert_load_fails_unchanged(tmp_path, objs, f"{shard} is listed by .* but missing", FileNotFoundError)


def test_missing_directory_and_no_state(tmp_path):
    objs = target()
    assert_load_fails_unchanged(
        tmp_path / "nope", objs, "neither a local directory nor a Hub repo id", FileNotFoundError
    )
    (tmp_path / "empty").mkdir()
    assert_load_fails_unchanged(tmp_path / "empty", objs, "no optimizer state in", FileNotFoundError)


def test_failure_while_applying_rolls_back(saved, monkeypatch):
    """Even an unexpected error inside the accumulator's load_state_dict leaves optimizer and scheduler as they were."""
    objs = target()

    def boom(self, state):
        raise RuntimeError("boom")

    monkeypatch.setattr(hf_optim.GradientAccumulator, "load_state_dict", boom)
    assert_load_fails_unchanged(saved, objs, "boom", RuntimeError)


# ---------------------------------------------------------------------------------------------------------------
# strict=False
# ---------------------------------------------------------------------------------------------------------------


def test_non_strict_loads_the_matching_part(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 3))
    saved_state = snapshot(opt)[0]
    save_state(tmp_path, opt, sched)

    # target: 'extra' is new, 'encoder' changed shape (hidden 5 -> encoder/norm/head all change), so use a
    # model whose encoder has the same shape but which has an extra layer
    model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"], extra=True)
    train(model2, opt2, sched2, batches(2, 1))
    before = snapshot(opt2)[0]
    report = load_state(tmp_path, opt2, sched2, strict=False)
    assert report.missing == ("extra.weight", "extra.bias")
    assert report.unexpected == () and report.mismatched == ()
    assert report.param_groups_restored and report.scheduler_loaded and not report.complete
    got = opt2.state_dict()
    names2 = [n for g in got["param_groups"] for n in g["param_names"]]
    names1 = [n for g in saved_state["param_groups"] for n in g["param_names"]]
    for i2, name in enumerate(names2):
        if name.startswith("extra"):
            assert_same_value(got["state"][i2], before["state"][i2], name)  # kept
        else:
            assert_same_value(got["state"][i2], saved_state["state"][names1.index(name)], name)


def test_non_strict_skips_mismatched_shapes(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 2))
    save_state(tmp_path, opt, sched)
    _model2, opt2, sched2 = make_setup(OPTIMIZERS["torch_adamw"], hidden=5)
    report = load_state(tmp_path, opt2, sched2, strict=False)
    assert set(report.mismatched) == {
        "encoder.weight",
        "encoder.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
    }
    assert report.loaded == ("head.bias",) or set(report.loaded) == {"head.bias"}
    assert report.notes


def test_non_strict_skips_parameters_whose_existing_state_differs(tmp_path):
    """Same parameter shapes, but the optimizer's own state has another key / another buffer shape: keep it."""
    model, opt, sched = make_setup(OPTIMIZERS["sgd_momentum"])
    train(model, opt, sched, batches(1, 2))
    saved_state = snapshot(opt)[0]
    save_state(tmp_path, opt)
    model2, opt2, _ = make_setup(OPTIMIZERS["sgd_momentum"], scheduler=False)
    train(model2, opt2, None, batches(2, 2))
    opt2.state[model2.encoder.weight]["extra_key"] = torch.zeros(1)
    opt2.state[model2.head.weight]["momentum_buffer"] = torch.zeros(7)
    before = snapshot(opt2)[0]

    report = load_state(tmp_path, opt2, strict=False)
    assert set(report.mismatched) == {"encoder.weight", "head.weight"}
    assert not report.complete
    assert set(report.loaded) == {n for n, _ in model2.named_parameters()} - {"encoder.weight", "head.weight"}
    got = opt2.state_dict()
    names = [n for g in got["param_groups"] for n in g["param_names"]]
    saved_names = [n for g in saved_state["param_groups"] for n in g["param_names"]]
    for i, name in enumerate(names):
        expected = before if name in ("encoder.weight", "head.weight") else saved_state
        j = i if expected is before else saved_names.index(name)
        assert_same_value(got["state"][i], expected["state"][j], name)

    assert_load_fails_unchanged(
        tmp_path,
        (model2, opt2, None, None),
        r"(?s)'encoder\.weight' has keys.*'head\.weight' has shape \(3, 8\) in the checkpoint but \(7,\)",
    )


def test_non_strict_report_is_incomplete_when_the_scheduler_or_accumulator_is_skipped(saved):
    _model, opt, _sched, acc = target()
    other = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    report = load_state(saved, opt, other, acc, strict=False)
    assert report.scheduler_skipped and not report.scheduler_loaded
    assert report.accumulator_loaded and not report.accumulator_skipped
    assert not report.missing and not report.unexpected and not report.mismatched
    assert not report.complete

    _model, opt, sched, _acc = target()
    acc2 = hf_optim.GradientAccumulator()
    acc2([torch.ones(2)])
    report = load_state(saved, opt, sched, acc2, strict=False)
    assert report.accumulator_skipped and not report.accumulator_loaded
    assert report.scheduler_loaded and not report.scheduler_skipped
    assert not report.complete

    _model, opt, sched, acc = target()
    report = load_state(saved, opt, sched, acc, strict=False)
    assert report.complete and not (report.scheduler_skipped or report.accumulator_skipped)


# ---------------------------------------------------------------------------------------------------------------
# atomic saving: interrupted at every rename, the directory loads the old or the new checkpoint
# ---------------------------------------------------------------------------------------------------------------


def _equal_state(a, b) -> bool:
    try:
        assert_same_value(a, b)
        return True
    except AssertionError:
        return False


@pytest.mark.parametrize(
    ("old_shard", "new_shard"), [("5GB", "5GB"), ("5GB", 2500), (2500, 2500), (1500, 4000), (2500, "5GB")]
)
def test_save_interrupted_at_each_rename_leaves_a_loadable_checkpoint(
    tmp_path, monkeypatch, old_shard, new_shard
):
    real_replace = os.replace
    k = 0
    while True:
        directory = tmp_path / f"run{k}"
        model, opt, sched = big_setup()
        acc = hf_optim.GradientAccumulator()
        acc([p.detach().clone() for p in model.parameters()])
        save_state(directory, opt, sched, acc, max_shard_size=old_shard)
        old = snapshot(opt, sched, acc)
        train(model, opt, sched, batches(10, 1))
        acc([p.detach().clone() for p in model.parameters()])
        new = snapshot(opt, sched, acc)

        calls = 0

        def interrupted(src, dst, _k=k):
            nonlocal calls
            if calls == _k:
                raise KeyboardInterrupt("simulated kill")
            calls += 1
            return real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", interrupted)
        try:
            save_state(directory, opt, sched, acc, max_shard_size=new_shard)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(atomic.os, "replace", real_replace)

        _, opt2, sched2 = big_setup()
        acc2 = hf_optim.GradientAccumulator()
        load_state(directory, opt2, sched2, acc2)
        got = snapshot(opt2, sched2, acc2)
        if finished:
            assert _equal_state(got, new)
            assert not [n for n in os.listdir(directory) if n.startswith(".")]
            break
        assert _equal_state(got, old) or _equal_state(got, new), f"interrupted after {k} renames: mixed state"
        k += 1
    assert k >= 3


# ---------------------------------------------------------------------------------------------------------------
# wrappers and the chunked writer
# ---------------------------------------------------------------------------------------------------------------


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


def test_scheduler_with_other_arguments_loads_its_position_and_keeps_its_config(saved):
    _model, opt, _, acc = target()
    sched = hf_optim.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=40)
    report = load_state(saved, opt, sched, acc)
    assert any("num_training_steps" in note for note in report.notes)
    assert sched.hf_optim_config["kwargs"]["num_training_steps"] == 40
    assert sched.last_epoch == 2  # 5 micro-steps with micro=2: 2 optimizer steps


@pytest.mark.parametrize("too_deep_for", ["json", "decoding"])
def test_deeply_nested_metadata_is_a_clear_error(saved, too_deep_for):
    # the JSON parser fails beyond the recursion limit; decoding (2 frames a level) at 3/5 of it already
    depth = 5 * sys.getrecursionlimit() if too_deep_for == "json" else 3 * sys.getrecursionlimit() // 5
    deep = "[" * depth + "]" * depth
    path = saved / OPTIMIZER_NAME
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    md["hf_optim"] = md["hf_optim"].replace(
        '"hyperparameters": {', '"hyperparameters": {"deep": ' + deep + ", ", 1
    )
    md["hf_optim"] = md["hf_optim"].replace(
        '"hyperparameters":{', '"hyperparameters":{"deep":' + deep + ",", 1
    )
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    assert_load_fails_unchanged(saved, target(), "nested too deeply", CheckpointError)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        hf_optim.inspect_state(saved)
    if too_deep_for == "json":
        assert not has_state(saved)
