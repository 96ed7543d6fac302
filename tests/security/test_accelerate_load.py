"""``hf_optim.accelerate_load_state`` against a hostile checkpoint folder (as downloaded from a Hub repo): no code
runs (the only exception being an ``allow_pickle=True`` opt-in), nothing is read from outside the folder, and a
failed load leaves every live object exactly as it was.

One attack table: each row plants something in a folder saved by ``accelerate_save_state`` (or by plain
``accelerator.save_state``), loads it from where the row says (the folder, the local Hub, Accelerate's own
``load_state`` once it uses hf_optim's format) and names the error it must raise. The planted pickles hold real
payloads that write a marker file when unpickled; the control (``plain Accelerate runs it``) shows they work, so a
missing marker means nothing unpickled them.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.checkpointing import save_custom_state
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim import CheckpointError
from hf_optim.integrations.accelerate import (
    accelerate_load_state,
    accelerate_prepare,
    accelerate_save_state,
    use_safetensors_state,
)
from tests.state.helpers import (
    assert_live_unchanged,
    assert_same_value,
    change_hf_optim_metadata,
    live_snapshot,
    snapshot,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Counter:
    """A registered object (``accelerator.register_for_checkpointing``): ``state_dict`` / ``load_state_dict`` are
    all Accelerate asks for."""

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


def _setup(make_accelerator, seed: int, *, counter: bool = False, two: bool = False):
    """An accelerator with a prepared model, optimizer and scheduler trained a few steps (a second model and
    optimizer with ``two``, a registered Counter with ``counter``); returns it and the live objects."""
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    model = Net()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-2, weight_decay=0.1)
    scheduler = hf_optim.create_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    objs = [model, optimizer, scheduler]
    if two:
        model2 = Net()
        objs += [model2, hf_optim.create_optimizer("adamw_hf", model2, lr=2e-2)]
    prepared = list(accelerate_prepare(accelerator, *objs))
    if counter:
        prepared.append(Counter())
        accelerator.register_for_checkpointing(prepared[-1])
    model, optimizer, scheduler = prepared[:3]
    for step in range(seed % 3 + 2):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if two:
        prepared[3](torch.randn(2, 4)).sum().backward()
        prepared[4].step()
        prepared[4].zero_grad()
    return accelerator, prepared


# --- the attacks ------------------------------------------------------------------------------------------------


def _pickled_custom_checkpoint(ckpt: Path, outside: Path) -> None:
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(outside / "PWNED")))


def _bad_second_optimizer(ckpt: Path, outside: Path) -> None:
    """A hostile value in the second optimizer's metadata: refused, but only after the first was loaded."""
    change_hf_optim_metadata(
        ckpt / "optimizer_1" / "optimizer.safetensors",
        lambda meta: meta["param_groups"][0]["hyperparameters"].update(lr=-1.0),
    )


def _stray_custom_checkpoint(ckpt: Path, outside: Path) -> None:
    """A file Accelerate insists on matching its registered objects (read by Accelerate itself when pickles are
    allowed): its check runs after hf_optim's load."""
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"n": 1}))


def _weights_linked_out(ckpt: Path, outside: Path) -> None:
    """model.safetensors -> a valid weights file of the same model outside the folder (other values)."""
    weights = {k: v + 1 for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(weights, outside / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(outside / "model.safetensors")


def _weights_at(ckpt: Path, make: Callable[[Path], Any]) -> None:
    (ckpt / "model.safetensors").unlink()
    make(ckpt / "model.safetensors")


def _pickled_weights(ckpt: Path, payload: Any) -> None:
    """model.safetensors replaced by a pytorch_model.bin (what ``safe_serialization=False`` writes)."""
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(payload))


@dataclass(frozen=True)
class AccelerateAttack:
    id: str
    plant: Callable[[Path, Path], Any]  # (checkpoint folder, a folder outside it)
    exc: type[Exception]
    match: str | None
    source: str = "folder"  # "folder", "hf-url", "hub-subfolder" or "accelerator" (its own load_state)
    saved_by: str = "hf_optim"  # "hf_optim" (accelerate_save_state) or "accelerate" (plain save_state)
    counter: bool = False
    two: bool = False
    allow_pickle: bool = False
    names: str = ""  # what the message must also name


_PICKLE = r"custom_checkpoint_0\.pkl"
_OUTSIDE = "outside the checkpoint folder"
ATTACKS = [
    AccelerateAttack(
        "custom-checkpoint-pickle", _pickled_custom_checkpoint, CheckpointError, _PICKLE, counter=True
    ),
    *(
        AccelerateAttack(
            f"plain-folder-custom-checkpoint-pickle-{source}",
            _pickled_custom_checkpoint,
            CheckpointError,
            _PICKLE,
            source=source,
            saved_by="accelerate",
            counter=True,
        )
        for source in ("folder", "accelerator", "hf-url", "hub-subfolder")
    ),
    AccelerateAttack(
        "custom-checkpoint-pickle-in-a-hub-repo",
        _pickled_custom_checkpoint,
        CheckpointError,
        _PICKLE,
        source="hf-url",
        counter=True,
    ),
    # refused after something was loaded: the rollback puts the objects back
    AccelerateAttack("second-optimizer", _bad_second_optimizer, CheckpointError, "optimizer_1", two=True),
    AccelerateAttack(
        "stray-custom-checkpoint", _stray_custom_checkpoint, RuntimeError, None, two=True, allow_pickle=True
    ),
    AccelerateAttack(
        "weights-linked-out-of-the-folder", _weights_linked_out, CheckpointError, _OUTSIDE, names="model"
    ),
    AccelerateAttack(
        "weights-linked-to-etc-passwd",
        lambda ckpt, outside: _weights_at(ckpt, lambda p: p.symlink_to("/etc/passwd")),
        CheckpointError,
        _OUTSIDE,
        names="model",
    ),
    AccelerateAttack(
        "pytorch-model-bin-running-code",
        lambda ckpt, outside: _pickled_weights(ckpt, Payload(outside / "PWNED")),
        CheckpointError,
        "weights_only=True",
        names="model",
    ),
    AccelerateAttack(
        "pytorch-model-bin-not-a-state-dict",
        lambda ckpt, outside: _pickled_weights(ckpt, [1, 2, 3]),
        CheckpointError,
        "not a model state_dict",
        names="model",
    ),
    AccelerateAttack(
        "weights-fifo",
        lambda ckpt, outside: _weights_at(ckpt, os.mkfifo),
        CheckpointError,
        "not a regular file",
        names="model",
    ),
]


def _save(make_accelerator, tmp_path: Path, attack: AccelerateAttack) -> Path:
    accelerator, _ = _setup(make_accelerator, 0, counter=attack.counter, two=attack.two)
    ckpt = tmp_path / "ckpt"
    if attack.saved_by == "hf_optim":
        accelerate_save_state(accelerator, ckpt)
    else:  # plain Accelerate's folder, with hf_optim's own state too: only the registered object is wrong
        accelerator.save_state(str(ckpt))
        assert (ckpt / "custom_checkpoint_0.pkl").is_file()
        accelerate_save_state(accelerator, tmp_path / "ours")
        for name in ("optimizer.safetensors", "scheduler.json"):
            shutil.copy(tmp_path / "ours" / name, ckpt / name)
    return ckpt


@pytest.mark.parametrize(
    "attack",
    [pytest.param(a, id=a.id) for a in ATTACKS],
)
def test_hostile_accelerate_checkpoint(make_accelerator, tmp_path: Path, request, attack) -> None:
    ckpt, outside = _save(make_accelerator, tmp_path, attack), tmp_path / "elsewhere"
    outside.mkdir()
    attack.plant(ckpt, outside)
    where, kwargs = ckpt, {"allow_pickle": attack.allow_pickle}
    if attack.source in ("hf-url", "hub-subfolder"):
        hub_api, repo = request.getfixturevalue("hub_api"), request.getfixturevalue("hub_repo_id")
        hub_api.create_repo(repo)
        hub_api.upload_folder(repo_id=repo, folder_path=str(ckpt), path_in_repo="run/checkpoint-3")
        where = f"hf://{repo}/run/checkpoint-3" if attack.source == "hf-url" else repo
        if attack.source == "hub-subfolder":
            kwargs["subfolder"] = "run/checkpoint-3"
    accelerator, live = _setup(make_accelerator, 4, counter=attack.counter, two=attack.two)
    before, before_data = live_snapshot(*live), snapshot(*live)
    if attack.source == "accelerator":
        use_safetensors_state(accelerator)
        load = lambda: accelerator.load_state(str(where))  # noqa: E731
    else:
        load = lambda: accelerate_load_state(accelerator, where, **kwargs)  # noqa: E731
    with pytest.raises(attack.exc, match=attack.match) as info:
        load()
    assert attack.names in str(info.value)
    if (outside / "PWNED").exists():
        pytest.fail("the checkpoint's pickle ran code")
    try:  # the data in every object (model weights, optimizer and scheduler state, registered objects)
        assert_same_value(snapshot(*live), before_data, "state_dict")
    except AssertionError as err:
        pytest.fail(f"a refused load changed the live objects: {err}")
    assert_live_unchanged(before, *live)  # and the objects themselves (the schedule functions included)


# --- the controls and what loads ---------------------------------------------------------------------------------


def test_payload_is_real_plain_accelerate_runs_it(make_accelerator, tmp_path: Path) -> None:
    attack = ATTACKS[1]  # a plain Accelerate folder with a pickled registered object
    ckpt, outside = _save(make_accelerator, tmp_path, attack), tmp_path / "elsewhere"
    outside.mkdir()
    attack.plant(ckpt, outside)
    accelerator, _ = _setup(make_accelerator, 4, counter=True)
    with pytest.raises(Exception):  # noqa: B017 - the payload returns None, which load_state_dict rejects
        accelerator.load_state(str(ckpt))
    assert (outside / "PWNED").read_text() == "pwned"


def test_allow_pickle_loads_a_folder_you_made(make_accelerator, tmp_path: Path) -> None:
    accelerator, live = _setup(make_accelerator, 0, counter=True)
    counter = live[-1]
    counter.count, counter.history = 7, torch.tensor([1.0, 2.0, 3.0])
    folder = tmp_path / "trusted"
    accelerate_save_state(accelerator, folder)
    # as an earlier hf_optim / plain Accelerate wrote registered objects: Accelerate's own writer
    (folder / "custom_checkpoint_0.safetensors").unlink()
    save_custom_state(counter, str(folder), 0)

    accelerator2, live2 = _setup(make_accelerator, 1, counter=True)
    with pytest.raises(CheckpointError, match=_PICKLE):
        accelerate_load_state(accelerator2, folder)
    assert live2[-1].count == 0
    accelerate_load_state(accelerator2, folder, allow_pickle=True)
    assert live2[-1].count == 7 and torch.equal(live2[-1].history, torch.tensor([1.0, 2.0, 3.0]))


def test_an_older_folders_rng_pickle_runs_no_code(make_accelerator, tmp_path: Path, caplog) -> None:
    """A folder from before hf_optim wrote random states as safetensors: its ``random_states_N.pkl`` is read with
    ``weights_only=True``, so a payload there cannot run, and the state it failed to give is named in a
    warning."""
    accelerator, _ = _setup(make_accelerator, 0, counter=True)
    folder = tmp_path / "ckpt"
    accelerate_save_state(accelerator, folder)
    (folder / "random_states_0.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save(Payload(marker), folder / "random_states_0.pkl")
    accelerator2, _ = _setup(make_accelerator, 1, counter=True)
    with caplog.at_level("WARNING", logger="hf_optim"):
        accelerate_load_state(accelerator2, folder)
    assert not marker.exists()
    assert any("random_states_0.pkl" in r.getMessage() for r in caplog.records)
    # the control: the same file unpickled without weights_only runs the payload
    torch.load(folder / "random_states_0.pkl", weights_only=False)
    assert marker.exists()


def test_checkpoint_folder_holds_no_pickle(make_accelerator, tmp_path: Path) -> None:
    accelerator, _ = _setup(make_accelerator, 0, counter=True)
    use_safetensors_state(accelerator)
    folder = tmp_path / "ckpt"
    accelerator.save_state(str(folder))
    names = sorted(os.listdir(folder))
    assert [n for n in names if not n.endswith((".safetensors", ".json"))] == []
    assert {"custom_checkpoint_0.safetensors", "random_states_0.safetensors"} <= set(names)
