"""No code from an Accelerate checkpoint folder runs in hf_optim's loads.

Each planted file holds a real pickle payload that writes a marker file when unpickled; the control
(``plain Accelerate runs it``) shows the payload works, so a missing marker after hf_optim's load means hf_optim
(or Accelerate on its behalf) never unpickled it. Registered objects (``custom_checkpoint_N.pkl``, read by
Accelerate with ``weights_only=False``) are refused with a CheckpointError naming the file, locally and through
the local Hub; ``allow_pickle=True`` loads a folder you made. The RNG file is read by Accelerate with
``weights_only=True``, so its payload cannot run either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.checkpointing import save_custom_state
from accelerate.state import AcceleratorState, GradientState

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.integrations.accelerate import (
    accelerate_load_state,
    accelerate_prepare,
    accelerate_save_state,
    use_safetensors_state,
)


class Counter:
    """A registered object: ``state_dict`` / ``load_state_dict`` are all Accelerate asks for."""

    def __init__(self) -> None:
        self.count = 0
        self.history = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"count": self.count, "history": self.history.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.history = state["history"].clone()


class Payload:
    """Unpickling this writes ``marker``: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def make_accelerator():
    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _setup(make_accelerator, seed: int = 0):
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-2)
    scheduler = hf_optim.create_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    model, optimizer, scheduler = accelerate_prepare(accelerator, model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, scheduler, counter


def _plant(path: Path, marker: Path) -> None:
    torch.save(Payload(marker), path)


def _hostile_folder(make_accelerator, tmp_path: Path, marker: Path) -> Path:
    """A checkpoint made by plain ``accelerator.save_state``, its registered object's file replaced by a payload."""
    accelerator, *_ = _setup(make_accelerator)
    folder = tmp_path / "plain"
    accelerator.save_state(str(folder))
    assert (folder / "custom_checkpoint_0.pkl").is_file()
    _plant(folder / "custom_checkpoint_0.pkl", marker)
    # hf_optim's own state too, so that only the pickled registered object is wrong with the folder
    accelerate_save_state(accelerator, tmp_path / "ours")
    for name in ("optimizer.safetensors", "scheduler.json"):
        shutil.copy(tmp_path / "ours" / name, folder / name)
    return folder


def test_payload_is_real_plain_accelerate_runs_it(make_accelerator, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = _hostile_folder(make_accelerator, tmp_path, marker)
    accelerator, *_ = _setup(make_accelerator)
    with pytest.raises(Exception):  # noqa: B017 - the payload returns None, which load_state_dict rejects
        accelerator.load_state(str(folder))
    assert marker.read_text() == "pwned"


def test_pickled_registered_object_is_refused(make_accelerator, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = _hostile_folder(make_accelerator, tmp_path, marker)
    accelerator, model, _, scheduler, _ = _setup(make_accelerator, seed=1)
    weights = model.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        accelerate_load_state(accelerator, folder)
    assert not marker.exists()
    assert torch.equal(model.weight, weights) and scheduler.scheduler.last_epoch == 0
    # the same through the accelerator's own load_state once it uses hf_optim's format
    use_safetensors_state(accelerator)
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        accelerator.load_state(str(folder))
    assert not marker.exists()


def test_pickled_registered_object_is_refused_from_the_local_hub(
    make_accelerator, tmp_path: Path, hub_api, hub_repo_id
) -> None:
    marker = tmp_path / "marker"
    folder = _hostile_folder(make_accelerator, tmp_path, marker)
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=str(folder), path_in_repo="ckpt")
    accelerator, *_ = _setup(make_accelerator, seed=1)
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        accelerate_load_state(accelerator, f"hf://{hub_repo_id}/ckpt")
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        accelerate_load_state(accelerator, hub_repo_id, subfolder="ckpt")
    assert not marker.exists()


def test_allow_pickle_loads_a_folder_you_made(make_accelerator, tmp_path: Path) -> None:
    accelerator, *_, counter = _setup(make_accelerator)
    counter.count, counter.history = 7, torch.tensor([1.0, 2.0, 3.0])
    folder = tmp_path / "trusted"
    accelerate_save_state(accelerator, folder)
    # as an earlier hf_optim / plain Accelerate wrote registered objects: Accelerate's own writer
    (folder / "custom_checkpoint_0.safetensors").unlink()
    save_custom_state(counter, str(folder), 0)

    accelerator2, *_, counter2 = _setup(make_accelerator, seed=1)
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl"):
        accelerate_load_state(accelerator2, folder)
    assert counter2.count == 0
    accelerate_load_state(accelerator2, folder, allow_pickle=True)
    assert counter2.count == 7 and torch.equal(counter2.history, torch.tensor([1.0, 2.0, 3.0]))


def test_an_older_folders_rng_pickle_runs_no_code(make_accelerator, tmp_path: Path, caplog) -> None:
    """A folder from before hf_optim wrote random states as safetensors: its ``random_states_N.pkl`` is read with
    ``weights_only=True``, so a payload there cannot run, and the state it failed to give is named in a
    warning."""
    accelerator, *_ = _setup(make_accelerator)
    folder = tmp_path / "ckpt"
    accelerate_save_state(accelerator, folder)
    (folder / "random_states_0.safetensors").unlink()
    marker = tmp_path / "marker"
    _plant(folder / "random_states_0.pkl", marker)
    accelerator2, *_ = _setup(make_accelerator, seed=1)
    with caplog.at_level("WARNING", logger="hf_optim"):
        accelerate_load_state(accelerator2, folder)
    assert not marker.exists()
    assert any("random_states_0.pkl" in r.getMessage() for r in caplog.records)
    # the control: the same file unpickled without weights_only runs the payload
    torch.load(folder / "random_states_0.pkl", weights_only=False)
    assert marker.exists()


def test_checkpoint_folder_holds_no_pickle(make_accelerator, tmp_path: Path) -> None:
    accelerator, *_ = _setup(make_accelerator)
    use_safetensors_state(accelerator)
    folder = tmp_path / "ckpt"
    accelerator.save_state(str(folder))
    names = sorted(os.listdir(folder))
    assert [n for n in names if not n.endswith((".safetensors", ".json"))] == []
    assert {"custom_checkpoint_0.safetensors", "random_states_0.safetensors"} <= set(names)
