"""No code from a Trainer checkpoint folder runs when ``hf_optim.Trainer`` resumes.

The files transformers 5.x itself reads on resume (``rng_state.pth``, ``scaler.pt``, legacy ``optimizer.pt`` /
``scheduler.pt``) are opened with ``torch.load(weights_only=True)``; ``training_args.bin`` is written but never
read. Each planted file holds a pickle payload that writes a marker file when unpickled (the control shows it
does with ``weights_only=False``); after the resume the marker must not exist.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.test_transformers_trainer import STOP_AT, script_args, train_script


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train_script.main(script_args(out, "--stop_after_step", str(STOP_AT)))
    return out / f"checkpoint-{STOP_AT}"


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    return folder


def test_payload_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "file.pt")
    torch.load(tmp_path / "file.pt", weights_only=False)
    assert marker.exists()


def test_planted_rng_scaler_and_training_args_do_not_run(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    assert (folder / "training_args.bin").is_file()
    torch.save(Payload(marker), folder / "training_args.bin")
    rng = "rng_state.pth"
    assert (folder / rng).is_file()
    torch.save(Payload(marker), folder / rng)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_script.main(script_args(tmp_path / "out", "--resume_from_checkpoint", str(folder)))
    assert not marker.exists()
    # without the RNG file the resume completes: training_args.bin was never unpickled
    os.remove(folder / rng)
    train_script.main(script_args(tmp_path / "out2", "--resume_from_checkpoint", str(folder)))
    assert not marker.exists()
    # a scaler.pt stops the resume (this run has no scaler to load it into) without being unpickled
    torch.save(Payload(marker), folder / "scaler.pt")
    with pytest.raises((pickle.UnpicklingError, AttributeError)):
        train_script.main(script_args(tmp_path / "out3", "--resume_from_checkpoint", str(folder)))
    assert not marker.exists()


def test_planted_legacy_optimizer_files_do_not_run(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    for name in ("optimizer.safetensors", "scheduler.json"):
        os.remove(folder / name)
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save(Payload(marker), folder / name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_script.main(script_args(tmp_path / "out", "--resume_from_checkpoint", str(folder)))
    assert not marker.exists()
