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
from tests.run_cache import once_per_run


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The checkpoint of a Trainer run stopped at step STOP_AT, made once per run."""
    out = once_per_run(
        tmp_path_factory,
        "trainer_run",
        lambda out: train_script.main(script_args(out, "--stop_after_step", str(STOP_AT))),
    )
    return out / f"checkpoint-{STOP_AT}"


def test_payload_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "file.pt")
    torch.load(tmp_path / "file.pt", weights_only=False)
    assert marker.exists()


# id -> (files replaced by a payload, files removed, what the resume raises: None when it completes)
ATTACKS = {
    "rng-state": (
        ("training_args.bin", "rng_state.pth"),
        (),
        (pickle.UnpicklingError, "Weights only load failed"),
    ),
    # without the RNG file the resume completes: training_args.bin is never unpickled
    "training-args": (("training_args.bin",), ("rng_state.pth",), None),
    # a scaler.pt stops the resume (this run has no scaler to load it into) without being unpickled
    "scaler": (
        ("training_args.bin", "scaler.pt"),
        ("rng_state.pth",),
        ((pickle.UnpicklingError, AttributeError), None),
    ),
    "legacy-optimizer-files": (
        ("optimizer.pt", "scheduler.pt"),
        ("optimizer.safetensors", "scheduler.json"),
        (pickle.UnpicklingError, "Weights only load failed"),
    ),
}


@pytest.mark.parametrize(("planted", "removed", "raises"), ATTACKS.values(), ids=ATTACKS.keys())
def test_planted_file_does_not_run(checkpoint: Path, tmp_path: Path, planted, removed, raises) -> None:
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    marker = tmp_path / "marker"
    # the planted files replace files the run wrote
    assert (folder / "training_args.bin").is_file() and (folder / "rng_state.pth").is_file()
    for name in removed:
        os.remove(folder / name)
    for name in planted:
        torch.save(Payload(marker), folder / name)
    args = script_args(tmp_path / "out", "--resume_from_checkpoint", str(folder))
    if raises is None:
        train_script.main(args)
    else:
        with pytest.raises(raises[0], match=raises[1]):
            train_script.main(args)
    assert not marker.exists()
