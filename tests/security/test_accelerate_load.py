"""``hf_optim.accelerate_load_state`` against a hostile checkpoint folder (as downloaded from a Hub repo): no code
runs (the only exception being an ``allow_pickle=True`` opt-in), nothing is read from outside the folder, and a
failed load leaves every live object exactly as it was."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim import CheckpointError
from hf_optim.integrations.accelerate import accelerate_load_state, accelerate_prepare, accelerate_save_state
from tests.state.helpers import change_hf_optim_metadata


@pytest.fixture
def make_accelerator():
    """Fresh Accelerator(cpu=True) (as tests/integrations/conftest.py): Accelerate keeps process-wide state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(**kwargs):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Counter:
    """A custom object registered with ``accelerator.register_for_checkpointing`` (e.g. an EMA or a step count)."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def _train(model, optimizer, scheduler, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _setup(make_accelerator, seed, *, counter=False, two=False):
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    model = Net()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-2, weight_decay=0.1)
    scheduler = hf_optim.create_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    objs = [model, optimizer, scheduler]
    if two:
        model2 = Net()
        opt2 = hf_optim.create_optimizer("adamw_hf", model2, lr=2e-2)
        objs += [model2, opt2]
    prepared = accelerate_prepare(accelerator, *objs)
    if counter:
        accelerator.register_for_checkpointing(Counter())
    _train(*prepared[:3], range(seed % 3 + 2))
    if two:
        prepared[3](torch.randn(2, 4)).sum().backward()
        prepared[4].step()
        prepared[4].zero_grad()
    return accelerator, prepared


def _snapshot(prepared):
    out = []
    for obj in prepared:
        if isinstance(obj, torch.nn.Module):
            out.append({k: v.clone() for k, v in obj.state_dict().items()})
        elif hasattr(obj, "optimizer") and hasattr(obj.optimizer, "state_dict"):
            out.append(copy.deepcopy(obj.optimizer.state_dict()))
        else:
            out.append(copy.deepcopy(obj.state_dict()))
    return out


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        _same(x, y)


def _same(x, y):
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y)
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _same(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for a, b in zip(x, y, strict=True):
            _same(a, b)
    else:
        assert x == y, (x, y)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_custom_checkpoint_pickle_runs_no_code(make_accelerator, tmp_path: Path) -> None:
    """A checkpoint folder (or Hub repo) whose ``custom_checkpoint_0.pkl`` holds a pickle that calls
    ``os.mkdir``: loading it into a run that registered one custom object runs that code."""
    accelerator, _ = _setup(make_accelerator, 0, counter=True)
    ckpt = tmp_path / "ckpt"
    accelerate_save_state(accelerator, ckpt)
    assert (ckpt / "custom_checkpoint_0.safetensors").is_file()
    marker = tmp_path / "PWNED"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    accelerator2, _ = _setup(make_accelerator, 5, counter=True)
    with contextlib.suppress(Exception):  # refusing is fine; running the payload is not
        accelerate_load_state(accelerator2, ckpt)
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_hub_repo_pickle_runs_no_code(make_accelerator, tmp_path: Path, hub_api, hub_repo_id) -> None:
    """The same through the Hub: a repo anyone can publish, resumed with ``hf://USER/REPO/SUBFOLDER`` as the
    README's Accelerate section shows."""
    accelerator, _ = _setup(make_accelerator, 0, counter=True)
    ckpt = tmp_path / "ckpt"
    accelerate_save_state(accelerator, ckpt)
    marker = tmp_path / "PWNED-hub"
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=str(ckpt), path_in_repo="run/checkpoint-3")
    accelerator2, _ = _setup(make_accelerator, 5, counter=True)
    with contextlib.suppress(Exception):
        accelerate_load_state(accelerator2, f"hf://{hub_repo_id}/run/checkpoint-3")
    assert not marker.exists(), "a Hub repo's pickle ran code"


@pytest.mark.parametrize("failure", ["second-optimizer", "stray-custom-checkpoint"])
def test_failed_accelerate_load_changes_nothing(make_accelerator, tmp_path: Path, failure: str) -> None:
    accelerator, _ = _setup(make_accelerator, 0, two=True)
    ckpt = tmp_path / "ckpt"
    accelerate_save_state(accelerator, ckpt)
    if failure == "second-optimizer":
        # a hostile value in the second optimizer's metadata: refused, but only after the first was loaded
        def change(meta):
            meta["param_groups"][0]["hyperparameters"]["lr"] = -1.0

        change_hf_optim_metadata(ckpt / "optimizer_1" / "optimizer.safetensors", change)
        expected = CheckpointError
    else:
        # a file Accelerate insists on matching its registered objects (read by Accelerate itself when pickles
        # are allowed): its check runs after hf_optim's load
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"n": 1}))
        expected = RuntimeError
    accelerator2, prepared = _setup(make_accelerator, 4, two=True)
    before = _snapshot(prepared)
    with pytest.raises(expected):
        accelerate_load_state(accelerator2, ckpt, allow_pickle=failure == "stray-custom-checkpoint")
    _assert_same(_snapshot(prepared), before)


def _link_out(ckpt: Path, outside: Path) -> None:
    """model.safetensors -> a valid weights file of the same model outside the folder (other values)."""
    weights = {k: v + 1 for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(weights, outside / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(outside / "model.safetensors")


def _pickled_weights(ckpt: Path, payload: Any) -> None:
    """model.safetensors replaced by a pytorch_model.bin (what ``safe_serialization=False`` writes)."""
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(payload))


MODEL_WEIGHTS_ATTACKS = {
    "link-out-of-the-folder": (_link_out, "outside the checkpoint folder"),
    "link-to-etc-passwd": (
        lambda ckpt, outside: (
            (ckpt / "model.safetensors").unlink(),
            (ckpt / "model.safetensors").symlink_to("/etc/passwd"),
        ),
        "outside the checkpoint folder",
    ),
    "pytorch-model-bin-running-code": (
        lambda ckpt, outside: _pickled_weights(ckpt, _Payload(str(outside / "PWNED"))),
        "weights_only=True",
    ),
    "pytorch-model-bin-not-a-state-dict": (
        lambda ckpt, outside: _pickled_weights(ckpt, [1, 2, 3]),
        "not a model state_dict",
    ),
    "fifo": (
        lambda ckpt, outside: ((ckpt / "model.safetensors").unlink(), os.mkfifo(ckpt / "model.safetensors")),
        "not a regular file",
    ),
}


@pytest.mark.parametrize("attack", MODEL_WEIGHTS_ATTACKS.values(), ids=MODEL_WEIGHTS_ATTACKS.keys())
def test_model_weights_are_read_only_from_inside_the_folder(make_accelerator, tmp_path: Path, attack) -> None:
    plant, message = attack
    accelerator, _ = _setup(make_accelerator, 0)
    ckpt, outside = tmp_path / "ckpt", tmp_path / "elsewhere"
    outside.mkdir()
    accelerate_save_state(accelerator, ckpt)
    plant(ckpt, outside)
    accelerator2, prepared = _setup(make_accelerator, 4)
    before = _snapshot(prepared)
    with pytest.raises(CheckpointError, match=message) as info:
        accelerate_load_state(accelerator2, ckpt)
    assert "model" in str(info.value)
    assert not (outside / "PWNED").exists()
    _assert_same(_snapshot(prepared), before)
