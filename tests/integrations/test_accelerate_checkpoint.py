"""accelerate_save_state / accelerate_load_state in one process: files written, exact resumption, the Hub,
several optimizers, failures that change nothing.

The reference for resumption is the same training run without interruption (one process on CPU is
deterministic, so continuing after a reload must give bit-identical weights, optimizer state and lr).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_optim
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
    assert {"model.safetensors", "optimizer.safetensors", "scheduler.json", "random_states_0.pkl"} <= names
    assert not names & {"optimizer.bin", "scheduler.bin"}
    assert sorted(load_file(checkpoint / "model.safetensors")) == sorted(Net().state_dict())
    scheduler = json.loads((checkpoint / "scheduler.json").read_text())
    assert json.dumps(scheduler)  # JSON, and it mentions the schedule by name
    assert "cosine" in json.dumps(scheduler)


def test_resume_is_bit_exact(make_accelerator, checkpoint: Path, uninterrupted: dict) -> None:
    _assert_equal_snapshots(_resume(make_accelerator, checkpoint), uninterrupted)


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

    # missing model weights
    (broken / "optimizer.safetensors").write_bytes((checkpoint / "optimizer.safetensors").read_bytes())
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
