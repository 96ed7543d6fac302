"""Shared helpers of the state tests: a small model, optimizers of several kinds, training loops, deep
comparisons and the "a failed load changes nothing" assertion."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import load_state


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


def big_setup(hidden=64):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"], hidden=hidden)
    train(model, opt, sched, batches(6, 2))
    return model, opt, sched


def target(**kwargs):
    """A trained optimizer / scheduler / accumulator, different from the saved ones."""
    model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"], **kwargs)
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, batches(9, 3, kwargs.get("dtype", torch.float32)), acc, micro=2)
    return model, opt, sched, acc


def assert_load_fails_unchanged(ckpt, objs, match, exc=ValueError, **kwargs):
    _model, opt, sched, acc = objs
    before = live_snapshot(opt, sched, acc)
    with pytest.raises(exc, match=match):
        load_state(ckpt, opt, sched, acc, **kwargs)
    assert_live_unchanged(before, opt, sched, acc)


def rewrite_metadata(path, change):
    """Rewrite a safetensors file's hf_optim metadata with the safetensors library."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    meta = json.loads(md["hf_optim"])
    change(meta)
    md["hf_optim"] = json.dumps(meta)
    safetensors.torch.save_file(tensors, str(path), metadata=md)


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


def _copy(value):
    """A deep copy of data (tensors, numbers, containers); other objects (functions, optimizers) by reference."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _same(a, b, where):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif isinstance(a, (str, int, float, bool, type(None))):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:
        assert a is b, f"{where}: a different object"


def _live_state(obj):
    """What a load could change in one live object (see ``live_snapshot``)."""
    if hasattr(obj, "param_groups"):  # an optimizer, or a wrapper of one (Accelerate's)
        inner = getattr(obj, "optimizer", obj)
        params = [p for g in inner.param_groups for p in g["params"]]
        return {
            "state": [_copy(dict(inner.state.get(p, {}))) for p in params],
            "state_keys": [id(k) for k in inner.state],
            "param_groups": [
                {k: (list(map(id, v)) if k == "params" else _copy(v)) for k, v in g.items()}
                for g in inner.param_groups
            ],
        }
    inner = getattr(obj, "scheduler", obj)
    if isinstance(inner, torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau):
        return {k: _copy(v) for k, v in vars(inner).items()}
    if isinstance(obj, torch.nn.Module):
        return {k: _copy(v) for k, v in obj.state_dict(keep_vars=True).items()}
    return _copy(obj.state_dict())  # an accumulator, an object registered for checkpointing


def live_snapshot(*objects):
    """Everything a load could change in the live objects (``None`` skipped): an optimizer's per-parameter state
    (by parameter identity) and param groups, a scheduler's whole ``__dict__``, a model's parameters and buffers,
    any other object's ``state_dict()``. Accelerate's wrappers are looked through."""
    return [_live_state(obj) for obj in objects if obj is not None]


def assert_live_unchanged(before, *objects):
    """The one check that a refused load changed nothing: ``live_snapshot(*objects)`` equals ``before``."""
    _same(live_snapshot(*objects), before, "live objects")


def rewrite_safetensors(path, change_metadata=None, change_tensors=None):
    """Rewrite a safetensors file with the safetensors library, changing its metadata dict and/or tensors."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    if change_metadata is not None:
        change_metadata(md)
    if change_tensors is not None:
        change_tensors(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=md)


def change_hf_optim_metadata(path, change):
    """Apply ``change`` to the parsed hf_optim metadata of a safetensors file."""

    def edit(md):
        meta = json.loads(md["hf_optim"])
        change(meta)
        md["hf_optim"] = json.dumps(meta)

    rewrite_safetensors(path, edit)


def trained(seed: int = 8, steps: int = 5, factory: str = "torch_adamw", **kwargs):
    """A trained (model, optimizer, scheduler, accumulator) with named parameters in two groups."""
    model, opt, sched = make_setup(OPTIMIZERS[factory], **kwargs)
    acc = hf_optim.GradientAccumulator()
    train(model, opt, sched, batches(seed, steps, kwargs.get("dtype", torch.float32)), acc, micro=2)
    return model, opt, sched, acc


def assert_refused(directory, objs, exc, file_name, match=None, *, fresh=False, **kwargs):
    """``load_state`` raises ``exc`` whose message names ``file_name`` (and matches ``match``), and leaves
    every live object exactly as it was (optimizer state + param groups, scheduler ``__dict__``, accumulator)."""
    _model, opt, sched, acc = objs
    if fresh:
        opt.state.clear()
    before = live_snapshot(opt, sched, acc)
    with pytest.raises(exc) as info:
        load_state(directory, opt, sched, acc, **kwargs)
    message = str(info.value)
    assert file_name in message, f"{file_name!r} not named in: {message}"
    if match is not None:
        assert re.search(match, message), f"{match!r} not in: {message}"
    assert_live_unchanged(before, opt, sched, acc)
    return message
