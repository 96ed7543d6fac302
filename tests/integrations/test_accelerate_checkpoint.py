"""accelerate_save_state / accelerate_load_state in one process: files written, exact resumption, the Hub,
several optimizers, failures that change nothing.

The reference for resumption is the same training run without interruption (one process on CPU is
deterministic, so continuing after a reload must give bit-identical weights, optimizer state and lr).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.integrations.accelerate import accelerate_load_state, accelerate_prepare, accelerate_save_state

STEPS_BEFORE, STEPS_AFTER = 3, 3


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _setup(make_accelerator, seed: int = 0, hidden: int = 6, optim: str = "adamw_hf", **acc_kwargs):
    accelerator = make_accelerator(**acc_kwargs)
    torch.manual_seed(seed)
    model = Net(hidden)
    optimizer = hf_optim.create_optimizer(optim, model, lr=1e-2, weight_decay=0.1)
    scheduler = hf_optim.create_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    model, optimizer, scheduler = accelerate_prepare(accelerator, model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _train(accelerator, model, optimizer, scheduler, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        accelerator.backward(((model(x) - y) ** 2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _snapshot(model, optimizer, scheduler) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
    }


def _assert_equal_snapshots(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"], b["optimizer"]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][i][key])), (i, key)
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture
def uninterrupted(make_accelerator) -> dict:
    objects = _setup(make_accelerator)
    _train(*objects, range(STEPS_BEFORE + STEPS_AFTER))
    return _snapshot(*objects[1:])


@pytest.fixture
def checkpoint(make_accelerator, tmp_path: Path) -> Path:
    objects = _setup(make_accelerator)
    _train(*objects, range(STEPS_BEFORE))
    out = tmp_path / "ckpt"
    assert accelerate_save_state(objects[0], out) == str(out)
    return out


def _resume(make_accelerator, source, **kwargs) -> dict:
    objects = _setup(
        make_accelerator, seed=123
    )  # other initial weights: everything must come from the checkpoint
    accelerate_load_state(objects[0], source, **kwargs)
    _train(*objects, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    return _snapshot(*objects[1:])


def test_checkpoint_files_are_safetensors_and_json(checkpoint: Path) -> None:
    names = set(os.listdir(checkpoint))
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
        "random_states_0.safetensors",
    } <= names
    assert [n for n in names if not n.endswith((".safetensors", ".json"))] == []  # no pickle at all
    assert sorted(load_file(checkpoint / "model.safetensors")) == sorted(Net().state_dict())
    scheduler = json.loads((checkpoint / "scheduler.json").read_text())
    assert json.dumps(scheduler)  # JSON, and it mentions the schedule by name
    assert "cosine" in json.dumps(scheduler)


def test_resume_is_bit_exact(make_accelerator, checkpoint: Path, uninterrupted: dict) -> None:
    _assert_equal_snapshots(_resume(make_accelerator, checkpoint), uninterrupted)


def test_safe_serialization_false_saves_the_model_as_accelerate_does(
    make_accelerator, tmp_path: Path, uninterrupted: dict
) -> None:
    """``save_state(safe_serialization=False)``, as Accelerate's API accepts: the model weights go to
    ``pytorch_model.bin`` (torch.save, as Accelerate writes them) and resume exactly, read back with
    ``weights_only=True``; the optimizer and scheduler state stay safetensors + JSON."""
    objects = _setup(make_accelerator)
    _train(*objects, range(STEPS_BEFORE))
    hf_optim.use_safetensors_state(objects[0])
    out = tmp_path / "ckpt"
    objects[0].save_state(str(out), safe_serialization=False)
    names = set(os.listdir(out))
    assert {"pytorch_model.bin", "optimizer.safetensors", "scheduler.json"} <= names
    assert "model.safetensors" not in names
    bare = Net()
    bare.load_state_dict(torch.load(out / "pytorch_model.bin", weights_only=True))  # Accelerate's own layout
    _assert_equal_snapshots(_resume(make_accelerator, out), uninterrupted)


def test_resume_from_local_hub(
    make_accelerator, checkpoint: Path, uninterrupted: dict, hub_api, hub_repo_id
) -> None:
    hub_api.create_repo(hub_repo_id)
    commit = hub_api.upload_folder(
        repo_id=hub_repo_id, folder_path=str(checkpoint), path_in_repo="run/checkpoint-3"
    )
    _assert_equal_snapshots(
        _resume(make_accelerator, hub_repo_id, subfolder="run/checkpoint-3"), uninterrupted
    )
    _assert_equal_snapshots(_resume(make_accelerator, f"hf://{hub_repo_id}/run/checkpoint-3"), uninterrupted)
    # A later commit replaces the weights with another architecture's: the pinned revision still resumes.
    torch.manual_seed(0)
    hub_api.upload_file(
        path_or_fileobj=_safetensors_file(Net(hidden=7).state_dict(), tmp=checkpoint.parent),
        path_in_repo="run/checkpoint-3/model.safetensors",
        repo_id=hub_repo_id,
    )
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        _resume(make_accelerator, f"hf://{hub_repo_id}/run/checkpoint-3")
    _assert_equal_snapshots(
        _resume(make_accelerator, hub_repo_id, subfolder="run/checkpoint-3", revision=commit.oid),
        uninterrupted,
    )
    _assert_equal_snapshots(
        _resume(make_accelerator, f"hf://{hub_repo_id}@{commit.oid}/run/checkpoint-3"), uninterrupted
    )


def test_resume_from_hub_cache_offline(
    make_accelerator, checkpoint: Path, hub_api, hub_repo_id, tmp_path
) -> None:
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=str(checkpoint), path_in_repo="ckpt")
    accelerate_load_state(
        _setup(make_accelerator, seed=1)[0], hub_repo_id, subfolder="ckpt"
    )  # fills the cache
    # HF_HUB_OFFLINE is read when huggingface_hub is imported: load in a fresh interpreter.
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from accelerate import Accelerator
from safetensors.torch import save_file
from tests.integrations.test_accelerate_checkpoint import _setup
from hf_optim.integrations.accelerate import accelerate_load_state
accelerator, model, optimizer, scheduler = _setup(lambda **kw: Accelerator(cpu=True, **kw), seed=2)
accelerate_load_state(accelerator, {hub_repo_id!r}, subfolder="ckpt")
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, {str(tmp_path / "loaded.safetensors")!r})
print("last_epoch", scheduler.scheduler.last_epoch)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"last_epoch {STEPS_BEFORE}" in proc.stdout
    expected = load_file(checkpoint / "model.safetensors")
    got = load_file(tmp_path / "loaded.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _safetensors_file(tensors: dict[str, torch.Tensor], tmp: Path) -> str:
    path = tmp / "other-weights.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


def test_weights_of_a_ddp_checkpoint_with_module_prefix_load(
    make_accelerator, checkpoint: Path, uninterrupted
) -> None:
    # A plain accelerator.save_state under DDP stores "module."-prefixed names: they load into a bare model.
    weights = load_file(checkpoint / "model.safetensors")
    save_file({f"module.{k}": v for k, v in weights.items()}, checkpoint / "model.safetensors")
    _assert_equal_snapshots(_resume(make_accelerator, checkpoint), uninterrupted)


def test_accumulator_state_round_trip(make_accelerator, tmp_path: Path) -> None:
    accelerator, model, optimizer, scheduler = _setup(make_accelerator)
    _train(accelerator, model, optimizer, scheduler, range(1))
    accumulator = hf_optim.GradientAccumulator()
    for step in range(2):  # mid-window: two micro-batches accumulated
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(50 + step))
        model(x).pow(2).sum().backward()
        accumulator.accumulate_from(model, num_items=3 + step)
    expected = copy.deepcopy(accumulator.state_dict())
    accelerate_save_state(accelerator, tmp_path / "ckpt", accumulator=accumulator)

    accelerator2, *_ = _setup(make_accelerator, seed=5)
    restored = hf_optim.GradientAccumulator()
    accelerate_load_state(accelerator2, tmp_path / "ckpt", accumulator=restored)
    got = restored.state_dict()
    assert got["step"] == expected["step"] == 2
    assert got["num_items"] == expected["num_items"] == 7
    assert len(got["gradients"]) == len(expected["gradients"])
    for a, b in zip(got["gradients"], expected["gradients"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_two_optimizers_each_with_its_scheduler(make_accelerator, tmp_path: Path) -> None:
    def setup(seed: int):
        accelerator = make_accelerator()
        torch.manual_seed(seed)
        gen, disc = Net(), Net()
        opt_g = hf_optim.create_optimizer("adamw_hf", gen, lr=1e-2)
        opt_d = hf_optim.create_optimizer("adam_weight_decay", disc, lr=2e-2, weight_decay=0.05)
        sched_d = hf_optim.create_scheduler("linear", opt_d, num_warmup_steps=1, num_training_steps=8)
        sched_g = hf_optim.create_scheduler("constant_with_warmup", opt_g, num_warmup_steps=3)
        # schedulers prepared in the other order than their optimizers: pairing goes by optimizer
        return accelerate_prepare(accelerator, gen, disc, opt_g, opt_d, sched_d, sched_g), accelerator

    def train(objs, steps):
        gen, disc, opt_g, opt_d, sched_d, sched_g = objs
        for step in steps:
            x = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
            (gen(x).pow(2).mean() + disc(x).abs().mean()).backward()
            for o in (opt_g, opt_d, sched_d, sched_g):
                o.step()
            opt_g.zero_grad()
            opt_d.zero_grad()

    def snap(objs):
        return [{k: v.clone() for k, v in m.state_dict().items()} for m in objs[:2]] + [
            objs[4].get_last_lr(),
            objs[5].get_last_lr(),
        ]

    objs, accelerator = setup(0)
    train(objs, range(5))
    expected = snap(objs)
    objs, accelerator = setup(0)
    train(objs, range(2))
    accelerate_save_state(accelerator, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "optimizer_1" / "optimizer.safetensors").is_file()
    assert (tmp_path / "ckpt" / "model_1.safetensors").is_file()
    objs, accelerator = setup(7)
    accelerate_load_state(accelerator, tmp_path / "ckpt")
    train(objs, range(2, 5))
    got = snap(objs)
    for a, b in zip(got[:2], expected[:2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert got[2:] == expected[2:]


def test_failed_loads_change_nothing(make_accelerator, checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"  # a checkpoint of another architecture
    accelerate_save_state(_setup(make_accelerator, hidden=7)[0], other)
    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    _train(accelerator, model, optimizer, scheduler, range(2))
    before = _snapshot(model, optimizer, scheduler)
    rng = torch.get_rng_state()

    # weights that do not fit: checked before the optimizer state is touched
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*fc1\.bias has shape \[7\], the model expects \[6\]"
    ):
        accelerate_load_state(accelerator, other)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)

    # no optimizer state in the folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(checkpoint):
        if name != "optimizer.safetensors":
            (broken / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="optimizer"):
        accelerate_load_state(accelerator, broken)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)

    # truncated model weights: refused before the optimizer state is touched
    (broken / "optimizer.safetensors").write_bytes((checkpoint / "optimizer.safetensors").read_bytes())
    data = (checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 16])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        accelerate_load_state(accelerator, broken)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)

    # missing model weights
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        accelerate_load_state(accelerator, broken)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)

    # a folder that does not exist and is not a repo id
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        accelerate_load_state(accelerator, tmp_path / "does-not-exist")
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)
    assert torch.equal(torch.get_rng_state(), rng)  # RNG untouched by the failed loads


def test_save_rejects_bad_arguments(make_accelerator, tmp_path: Path) -> None:
    accelerator, *_ = _setup(make_accelerator)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        accelerate_save_state(accelerator, a_file)
    bare = make_accelerator()
    with pytest.raises(ValueError, match="accumulator"):
        accelerate_save_state(bare, tmp_path / "c", accumulator=hf_optim.GradientAccumulator())


# --------------------------------------------------------------------------------------------------------------
# Registered objects (accelerator.register_for_checkpointing): safetensors + JSON, validated
# --------------------------------------------------------------------------------------------------------------


class Registered:
    """A registered object whose state exercises every supported value type."""

    def __init__(self) -> None:
        self.state = {"count": 0}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _rich_state() -> dict:
    return {
        "count": 3,
        "ratio": 0.25,
        "missing": float("nan"),
        "big": float("inf"),
        "flag": True,
        "name": "run",
        "nothing": None,
        "pair": (1, "two"),
        "by_step": {0: torch.arange(4, dtype=torch.int32), 5: [torch.ones(2, 2, dtype=torch.bfloat16)]},
        "nested": [{"a": [1, 2.5, None]}],
    }


def _assert_same_value(got, expected) -> None:
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_same_value(got[k], expected[k])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same_value(a, b)
    elif isinstance(expected, float) and expected != expected:
        assert got != got
    else:
        assert got == expected


def test_registered_objects_round_trip_as_safetensors(make_accelerator, tmp_path: Path) -> None:
    accelerator, *_ = _setup(make_accelerator)
    first, second = Registered(), Registered()
    first.state, second.state = _rich_state(), {"count": 9}
    accelerator.register_for_checkpointing(first, second)
    accelerate_save_state(accelerator, tmp_path / "ckpt")
    assert not [
        n for n in os.listdir(tmp_path / "ckpt") if n.startswith("custom_checkpoint") and n.endswith(".pkl")
    ]
    # raw bytes: a safetensors header (little-endian u64 length + JSON) whose metadata holds the value tree
    raw = (tmp_path / "ckpt" / "custom_checkpoint_0.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    tree = json.loads(header["__metadata__"]["hf_optim"])
    assert tree["format"] == "hf_optim.object" and tree["kind"] == "accelerate.registered_object"
    assert tree["value"]["dict"]["count"] == 3 and tree["value"]["dict"]["missing"] == {"float": "nan"}

    accelerator2, *_ = _setup(make_accelerator, seed=3)
    new_first, new_second = Registered(), Registered()
    accelerator2.register_for_checkpointing(new_first, new_second)
    accelerate_load_state(accelerator2, tmp_path / "ckpt")
    _assert_same_value(new_first.state, _rich_state())
    assert new_second.state == {"count": 9}


def test_registered_state_with_unsupported_values_is_not_saved(make_accelerator, tmp_path: Path) -> None:
    accelerator, *_ = _setup(make_accelerator)
    obj = Registered()
    obj.state = {"callback": print}
    accelerator.register_for_checkpointing(obj)
    with pytest.raises(TypeError, match="builtin_function_or_method"):
        accelerate_save_state(accelerator, tmp_path / "ckpt")


def _rewrite_registered(path: Path, change) -> None:
    """Rewrite a valid registered-object file: ``change(metadata, tensors)`` edits the JSON document / tensors."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    doc = json.loads(header["__metadata__"]["hf_optim"])
    tensors = load_file(path)
    text = change(doc, tensors)
    save_file(
        tensors,
        path,
        metadata={"format": "pt", "hf_optim": text if isinstance(text, str) else json.dumps(doc)},
    )


def _tensor_node(doc: dict) -> dict:
    return doc["value"]["dict"]["buffer"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc, t: doc.update(kind="accelerate.other"), "accelerate.other"),
        (lambda doc, t: doc.update(format_version=99), "version"),
        (lambda doc, t: doc.update(format="hf_optim.optimizer"), ""),
        (lambda doc, t: doc.pop("value"), ""),
        (lambda doc, t: _tensor_node(doc).update(tensor="value.elsewhere"), ""),  # tensor not in the file
        (
            lambda doc, t: t.update({"value.extra": torch.zeros(1)}),
            "do not match",
        ),  # tensor not in the metadata
        (lambda doc, t: _tensor_node(doc).update(shape=[3]), ""),  # header and metadata disagree
        (lambda doc, t: doc["value"]["dict"].update(code={"pickle": "gASVAAAAAA=="}), ""),  # unknown tag
        (lambda doc, t: json.dumps(doc).replace('"count": 1', '"count": NaN'), ""),  # non-standard JSON
        (lambda doc, t: json.dumps(doc).replace('"count": 1', '"count": ' + "[" * 5000 + "]" * 5000), ""),
    ],
)
def test_hostile_registered_files_are_refused_before_anything_changes(
    make_accelerator, checkpoint: Path, change, message
) -> None:
    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    obj = Registered()
    obj.state = {"count": 1, "buffer": torch.ones(2)}
    accelerator.register_for_checkpointing(obj)
    accelerate_save_state(accelerator, checkpoint.parent / "valid")
    path = checkpoint / "custom_checkpoint_0.safetensors"
    path.write_bytes((checkpoint.parent / "valid" / path.name).read_bytes())
    _rewrite_registered(path, change)
    obj.state = {"count": 0}
    before = _snapshot(model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match=rf"custom_checkpoint_0\.safetensors.*{message}") as info:
        accelerate_load_state(accelerator, checkpoint)
    assert message in str(info.value)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)
    assert obj.state == {"count": 0}


def test_registered_files_must_match_the_registered_objects(make_accelerator, checkpoint: Path) -> None:
    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    accelerator.register_for_checkpointing(Registered())  # the checkpoint has no registered object
    before = _snapshot(model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="register_for_checkpointing"):
        accelerate_load_state(accelerator, checkpoint)
    (checkpoint / "custom_checkpoint_0.safetensors").mkdir()  # a folder where a file is expected
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.safetensors: not a regular file"):
        accelerate_load_state(accelerator, checkpoint)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)


def test_accelerate_files_must_be_regular_files(make_accelerator, checkpoint: Path) -> None:
    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    before = _snapshot(model, optimizer, scheduler)
    (checkpoint / "random_states_0.safetensors").unlink()
    (checkpoint / "random_states_0.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"random_states_0\.safetensors is not a regular file"):
        accelerate_load_state(accelerator, checkpoint)
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)


# --------------------------------------------------------------------------------------------------------------
# All or nothing: a failure after the first change puts everything back
# --------------------------------------------------------------------------------------------------------------


def _scheduler_dict(scheduler) -> dict:
    inner = scheduler.scheduler
    return {k: copy.deepcopy(v) for k, v in inner.__dict__.items() if k not in ("optimizer", "lr_lambdas")}


def _lambda_values(scheduler) -> list[float]:
    return [fn(step) for fn in scheduler.scheduler.lr_lambdas for step in range(12)]


def test_failure_inside_accelerate_load_state_restores_everything(
    make_accelerator, tmp_path: Path, uninterrupted: dict
) -> None:
    accelerator, model, optimizer, scheduler = _setup(make_accelerator)
    saved_obj = Registered()
    saved_obj.state = {"count": 3, "buffer": torch.full((2,), 3.0)}
    accelerator.register_for_checkpointing(saved_obj)
    _train(accelerator, model, optimizer, scheduler, range(STEPS_BEFORE))
    accelerate_save_state(accelerator, tmp_path / "ckpt")

    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    obj = Registered()
    obj.state = {"count": 1, "buffer": torch.zeros(2)}
    accelerator.register_for_checkpointing(obj)
    _train(accelerator, model, optimizer, scheduler, range(1))
    before = _snapshot(model, optimizer, scheduler)
    sched_dict, lambdas = _scheduler_dict(scheduler), _lambda_values(scheduler)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    state_obj, groups_obj = optimizer.optimizer.state, optimizer.optimizer.param_groups
    rng, step = torch.get_rng_state(), accelerator.step
    seen = {}

    def failing_hook(models, input_dir):
        # Runs inside accelerator.load_state, after hf_optim's own part was applied.
        seen["last_epoch"] = scheduler.scheduler.last_epoch
        seen["count"] = obj.state["count"]
        raise RuntimeError("Accelerate's part failed")

    handle = accelerator.register_load_state_pre_hook(failing_hook)
    with pytest.raises(RuntimeError, match="Accelerate's part failed"):
        accelerate_load_state(accelerator, tmp_path / "ckpt")
    handle.remove()
    assert seen == {"last_epoch": STEPS_BEFORE, "count": 3}  # the loads had happened ...
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), before)  # ... and were undone
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    assert optimizer.optimizer.state is state_obj and optimizer.optimizer.param_groups is groups_obj
    assert _scheduler_dict(scheduler) == sched_dict and _lambda_values(scheduler) == lambdas
    assert scheduler.scheduler.optimizer is optimizer.optimizer
    assert obj.state["count"] == 1 and torch.equal(obj.state["buffer"], torch.zeros(2))
    assert torch.equal(torch.get_rng_state(), rng) and accelerator.step == step

    # and the same accelerator then resumes exactly
    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=9)
    accelerator.register_for_checkpointing(Registered())
    accelerate_load_state(accelerator, tmp_path / "ckpt")
    _train(accelerator, model, optimizer, scheduler, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), uninterrupted)


def test_failure_in_the_second_optimizer_restores_the_first(make_accelerator, tmp_path: Path) -> None:
    def setup(seed: int, hidden: int = 6):
        accelerator = make_accelerator()
        torch.manual_seed(seed)
        gen, disc = Net(), Net(hidden)
        opt_g = hf_optim.create_optimizer("adamw_hf", gen, lr=1e-2)
        opt_d = hf_optim.create_optimizer("adamw_hf", disc, lr=2e-2)
        sched_g = hf_optim.create_scheduler("linear", opt_g, num_warmup_steps=1, num_training_steps=8)
        objs = accelerate_prepare(accelerator, gen, disc, opt_g, opt_d, sched_g)
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))
        (objs[0](x).pow(2).mean() + objs[1](x).abs().mean()).backward()
        objs[2].step(), objs[3].step(), objs[4].step()
        return accelerator, objs

    accelerator, _ = setup(0)
    accelerate_save_state(accelerator, tmp_path / "ckpt")
    accelerator, _ = setup(0, hidden=7)
    accelerate_save_state(accelerator, tmp_path / "other")
    # optimizer 1's state from a discriminator of another width: valid files, wrong shapes for this model
    shutil.rmtree(tmp_path / "ckpt" / "optimizer_1")
    shutil.copytree(tmp_path / "other" / "optimizer_1", tmp_path / "ckpt" / "optimizer_1")

    accelerator, objs = setup(5)
    opt_g, sched_g = objs[2], objs[4]
    before = copy.deepcopy(opt_g.optimizer.state_dict()), copy.deepcopy(sched_g.state_dict())
    with pytest.raises(ValueError, match="optimizer_1"):
        accelerate_load_state(accelerator, tmp_path / "ckpt")
    after = opt_g.optimizer.state_dict(), sched_g.state_dict()
    assert after[0]["param_groups"] == before[0]["param_groups"] and after[1] == before[1]
    for i, state in before[0]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after[0]["state"][i][key]), torch.as_tensor(value)), (i, key)


# --------------------------------------------------------------------------------------------------------------
# use_safetensors_state: the accelerator's own save_state() / load_state() in hf_optim's format
# --------------------------------------------------------------------------------------------------------------


class StepCounter:
    def __init__(self) -> None:
        self.steps = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"].clone()


def test_plain_save_state_and_load_state_after_use_safetensors_state(
    make_accelerator, tmp_path: Path, uninterrupted: dict
) -> None:
    from accelerate.utils import ProjectConfiguration

    def project():
        return ProjectConfiguration(
            project_dir=str(tmp_path / "run"), automatic_checkpoint_naming=True, total_limit=1
        )

    accelerator, model, optimizer, scheduler = _setup(make_accelerator, project_config=project())
    assert hf_optim.use_safetensors_state(accelerator) is accelerator
    counter = StepCounter()
    accelerator.register_for_checkpointing(counter)
    for steps in (range(1), range(1, STEPS_BEFORE)):
        _train(accelerator, model, optimizer, scheduler, steps)
        counter.steps += len(steps)
        accelerator.save_state()  # checkpoint_0, then checkpoint_1 (total_limit=1 removes checkpoint_0)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_1"]
    files = sorted(os.listdir(checkpoints / "checkpoint_1"))
    assert [n for n in files if not n.endswith((".safetensors", ".json"))] == []
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
        "custom_checkpoint_0.safetensors",
    } <= set(files)

    accelerator, model, optimizer, scheduler = _setup(make_accelerator, seed=123, project_config=project())
    hf_optim.use_safetensors_state(accelerator)
    restored = StepCounter()
    accelerator.register_for_checkpointing(restored)
    assert accelerator.load_state() == str(checkpoints / "checkpoint_1")  # the latest, as Accelerate picks it
    assert int(restored.steps) == STEPS_BEFORE
    _train(accelerator, model, optimizer, scheduler, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    _assert_equal_snapshots(_snapshot(model, optimizer, scheduler), uninterrupted)
    # an explicit folder works as with Accelerate; arguments for other backends are refused
    assert accelerator.load_state(str(checkpoints / "checkpoint_1")) == str(checkpoints / "checkpoint_1")
    with pytest.raises(TypeError, match="load_kwargs"):
        accelerator.load_state(load_kwargs={"weights_only": False})


def test_hub_download_keywords_are_forwarded(
    make_accelerator, checkpoint: Path, hub_api, hub_repo_id, tmp_path
) -> None:
    hub_api.create_repo(hub_repo_id, repo_type="dataset")
    hub_api.upload_folder(
        repo_id=hub_repo_id, folder_path=str(checkpoint), path_in_repo="ckpt", repo_type="dataset"
    )
    accelerator, *_ = _setup(make_accelerator, seed=4)
    folder = accelerate_load_state(accelerator, hub_repo_id, repo_type="dataset", subfolder="ckpt")
    assert "datasets--" in folder
    cache = tmp_path / "own-cache"
    folder = accelerate_load_state(
        accelerator, hub_repo_id, repo_type="dataset", subfolder="ckpt", cache_dir=cache
    )
    assert Path(folder).resolve().is_relative_to(cache.resolve())
    # served from that cache without the network, and fetched again on request
    folder = accelerate_load_state(
        accelerator,
        hub_repo_id,
        repo_type="dataset",
        subfolder="ckpt",
        cache_dir=cache,
        local_files_only=True,
    )
    assert Path(folder).resolve().is_relative_to(cache.resolve())
    accelerate_load_state(
        accelerator, hub_repo_id, repo_type="dataset", subfolder="ckpt", cache_dir=cache, force_download=True
    )
    with pytest.raises(LocalEntryNotFoundError, match=hub_repo_id.split("/")[1]):
        accelerate_load_state(
            accelerator,
            hub_repo_id,
            repo_type="dataset",
            subfolder="ckpt",
            cache_dir=tmp_path / "empty",
            local_files_only=True,
        )


def test_random_states_are_safetensors_and_restored_exactly(make_accelerator, tmp_path: Path) -> None:
    """Python's, numpy's and torch's generators and Accelerate's step counter come back from
    ``random_states_0.safetensors``: the draws after the load are those that followed the save."""
    import random

    import numpy as np

    accelerator, *_ = _setup(make_accelerator)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # a cached gaussian in numpy's state
    accelerator.step = 7
    accelerate_save_state(accelerator, tmp_path / "ckpt")
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    accelerator2, *_ = _setup(make_accelerator, seed=5)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    accelerate_load_state(accelerator2, tmp_path / "ckpt")
    assert accelerator2.step == 7
    assert (
        random.random(),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    ) == expected


def test_an_older_folders_pickled_random_states_still_load(make_accelerator, tmp_path: Path, caplog) -> None:
    """A folder from before (Accelerate's ``random_states_0.pkl``, no safetensors file) restores the generators
    through ``weights_only=True``; one that cannot be read is named in a warning, not skipped in silence."""
    import random

    import numpy as np

    accelerator, *_ = _setup(make_accelerator)
    accelerate_save_state(accelerator, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "random_states_0.safetensors").unlink()
    state = {
        "step": 3,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    torch.save(state, tmp_path / "ckpt" / "random_states_0.pkl")  # what Accelerate writes
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    accelerator2, *_ = _setup(make_accelerator, seed=5)
    accelerate_load_state(accelerator2, tmp_path / "ckpt")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert accelerator2.step == 3

    (tmp_path / "ckpt" / "random_states_0.pkl").write_bytes(b"\x80\x04not a pickle")
    with caplog.at_level("WARNING", logger="hf_optim"):
        accelerate_load_state(accelerator2, tmp_path / "ckpt")
    assert any(
        "random_states_0.pkl" in r.getMessage() and "could not be restored" in r.getMessage()
        for r in caplog.records
    )
