"""Value trees <-> JSON + tensors: exotic Python values keep their types, tags vs names, registered types."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import (
    OPTIMIZER_NAME,
    CheckpointError,
    has_state,
    load_state,
    save_state,
)
from tests.state.helpers import (
    Net,
    OddState,
    TensorKeyed,
    assert_same_value,
    batches,
    snapshot,
)


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
    # live values of the same structure (a None hyperparameter takes only None or a plain scalar)
    opt2 = OddState(
        [
            {
                "params": named("encoder"),
                "lr": 0.0,
                "betas": (0.0, 0.0),
                "weird": [0.0] * 6 + [None, "", False, 0],
                "nested": {"a": (0, [0.0]), 3: ""},
            },
            {
                "params": named("head") + named("norm"),
                "lr": 0.0,
                "betas": (0.0, 0.0),
                "weird": [],
                "nested": {},
            },
        ]
    )
    load_state(tmp_path, opt2)
    got = opt2.state_dict()
    assert_same_value(got, expected, "odd")
    # the float32 buffers of bfloat16 parameters keep float32 (torch alone would cast them to bfloat16)
    assert all(s["buf32"].dtype == torch.float32 for s in got["state"].values())
    assert isinstance(got["state"][0]["count"], int) and isinstance(got["state"][0]["scale"], float)


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
    with pytest.raises(TypeError, match=r"head\.weight.*'callback'"):
        save_state(tmp_path, opt)
    assert not os.path.exists(tmp_path / OPTIMIZER_NAME)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


class Schedule:
    """A stand-in for an object stored by class name + JSON arguments."""

    def __init__(self, warmup: float, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.warmup, self.total) == (other.warmup, other.total)


def _schedule_from_json(doc: dict) -> Schedule:
    if set(doc) != {"warmup", "total"} or not isinstance(doc["total"], int):
        raise ValueError(f"bad arguments {doc}")
    return Schedule(float(doc["warmup"]), doc["total"])


@pytest.fixture
def registered():
    from hf_optim.state import register_json_type

    register_json_type(
        Schedule,
        name="test.Schedule",
        to_json=lambda s: {"warmup": s.warmup, "total": s.total},
        from_json=_schedule_from_json,
    )
    yield
    from hf_optim.state import codec

    codec._TYPES_BY_CLASS.pop(Schedule, None)
    codec._TYPES_BY_NAME.pop("test.Schedule", None)


def test_registered_json_type_round_trips_in_param_groups(tmp_path, registered):
    model = Net()
    opt = torch.optim.SGD([{"params": list(model.parameters()), "schedule": Schedule(0.1, 100)}], lr=0.1)
    save_state(tmp_path, opt)
    with safe_open(str(tmp_path / OPTIMIZER_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["hf_optim"])
    assert meta["param_groups"][0]["hyperparameters"]["schedule"] == {
        "object": "test.Schedule",
        "json": {"warmup": 0.1, "total": 100},
    }
    opt2 = torch.optim.SGD([{"params": list(Net().parameters()), "schedule": Schedule(0.5, 1)}], lr=0.1)
    load_state(tmp_path, opt2)
    assert opt2.param_groups[0]["schedule"] == Schedule(0.1, 100)


def test_decoding_constructs_only_registered_names(registered):
    from hf_optim.state.codec import decode

    assert decode({"object": "test.Schedule", "json": {"warmup": 1, "total": 2}}, {}, "f") == Schedule(1.0, 2)
    with pytest.raises(CheckpointError, match=r"f: object type 'os.system' is not registered"):
        decode({"object": "os.system", "json": {"command": "true"}}, {}, "f")
    with pytest.raises(CheckpointError, match=r"cannot build 'test\.Schedule'.*bad arguments"):
        decode({"object": "test.Schedule", "json": {"warmup": 1, "total": "x"}}, {}, "f")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        decode({"object": "test.Schedule", "json": [1, 2]}, {}, "f")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        decode(
            {"object": "test.Schedule", "json": {"warmup": {"tensor": "t"}, "total": torch.zeros(1)}}, {}, "f"
        )


def test_register_json_type_validates_its_arguments(registered):
    from hf_optim.state import register_json_type

    with pytest.raises(TypeError):
        register_json_type("x", name="n", to_json=dict, from_json=dict)
    with pytest.raises(ValueError, match="already registered"):
        register_json_type(Net, name="test.Schedule", to_json=dict, from_json=dict)


def test_object_state_round_trips_nested_values(tmp_path):
    from hf_optim.state import load_object_state, save_object_state

    value = {
        "a": [1, 2.5, None, True, "s", (3, torch.arange(4))],
        "t": torch.randn(2, 3, dtype=torch.float64),
        "nested": {"x": {"y": [torch.zeros(0)]}},
        5: "int key",
    }
    path = tmp_path / "obj.safetensors"
    save_object_state(path, value, kind="sampler")
    assert [p.name for p in tmp_path.iterdir()] == ["obj.safetensors"]  # no temporary left behind
    got = load_object_state(path, kind="sampler")
    assert_same_value(got, value, "object")
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file any reader opens
        assert set(f.keys()) == {"value.0.5.1", "value.1", "value.2.x.y.0"}  # items of a dict with an int key
    with pytest.raises(CheckpointError, match=r"obj\.safetensors holds 'sampler' state, not 'rng'"):
        load_object_state(path, kind="rng")
    with pytest.raises(TypeError, match="cannot be saved"):
        save_object_state(path, {"f": print}, kind="sampler")
    assert load_object_state(path, kind="sampler").keys() == value.keys()  # the failed save left the file


def test_a_tensor_referenced_twice_is_refused():
    from hf_optim.state.codec import TensorHeader, check_tensor_nodes

    node = {"tensor": "t", "dtype": "float32", "shape": [2]}
    headers = {"t": TensorHeader("x.safetensors", torch.float32, (2,), 8)}
    check_tensor_nodes([node], headers, "x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 't' is referenced more than once"):
        check_tensor_nodes([node, {"dict": {"b": dict(node)}}], headers, "x.safetensors")


def test_encoder_refuses_what_readers_would_refuse_as_too_deep():
    """The encoded JSON of a value plus the 4 levels of the file around it stays within MAX_JSON_DEPTH; deeper
    values are a ValueError (never a RecursionError), counted in JSON levels (a list 1, a dict / tuple 2)."""
    from hf_optim.state.codec import Encoder
    from hf_optim.state.format import MAX_JSON_DEPTH, parse_json

    def nested(depth):
        out = cur = []
        for _ in range(depth - 1):
            cur.append([])
            cur = cur[0]
        return out

    ok = nested(MAX_JSON_DEPTH - 4)
    node = Encoder().encode(ok, "k", "w")
    text = json.dumps({"a": {"b": [{"c": node}]}})  # 4 levels around the value, as in the metadata
    assert parse_json(text, "x")["a"]["b"][0]["c"] == ok
    with pytest.raises(ValueError, match="w: nested too deeply"):
        Encoder().encode(nested(MAX_JSON_DEPTH - 3), "k", "w")
    with pytest.raises(ValueError, match="w: nested too deeply"):
        Encoder().encode(nested(5000), "k", "w")
    deep_dict: dict = {}
    cur = deep_dict
    for _ in range(MAX_JSON_DEPTH // 2):
        cur["x"] = {}
        cur = cur["x"]
    with pytest.raises(ValueError, match="w: nested too deeply"):
        Encoder().encode(deep_dict, "k", "w")
