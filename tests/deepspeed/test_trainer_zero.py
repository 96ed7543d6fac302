"""hf_optim.Trainer under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, gloo): checkpoints hold hf_optim's
safetensors ZeRO state and no DeepSpeed pickles; resuming from one (ZeRO-3 from a local folder, ZeRO-2 from the
Hub after a run interrupted at the checkpoint) ends bit for bit where the uninterrupted run ends. Runs ``scripts/gpu_check_deepspeed.py`` (the GPU check) through ``accelerate_gloo.py``, the documented
patch of Accelerate's backend choice on CPU-only machines."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.run_cache import once_per_run

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check_deepspeed.py"
HARNESS = Path(__file__).resolve().parent / "accelerate_gloo.py"


def _run(out: Path, mode: str, stage: int, *repo: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [*cmd, str(HARNESS), str(SCRIPT), str(out), mode, str(stage), *repo],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The uninterrupted run under ZeRO stage ``stage`` (8 steps, a checkpoint every 4), run once per test run:
    its folder, with its checkpoints in ``deepspeed/`` and its final weights in ``deepspeed_full.safetensors``."""

    def run(stage: int) -> Path:
        return once_per_run(
            tmp_path_factory, f"trainer-zero{stage}-uninterrupted", lambda o: _run(o, "full", stage)
        )

    return run


def _assert_same_weights(expected: Path, resumed: Path) -> None:
    full, got = load_file(expected), load_file(resumed)
    assert full.keys() == got.keys() and full
    for key, value in full.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_checkpoints_hold_zero_state_in_safetensors(uninterrupted, stage: int) -> None:
    checkpoint = uninterrupted(stage) / "deepspeed" / "checkpoint-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.sharded.json" in names and not [n for n in names if n.startswith("global_step")]
    # training_args.bin: transformers' own record of the arguments, written and never read back
    pickles = [p.name for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    assert pickles == ["training_args.bin"]


def test_trainer_resumes_a_local_zero3_checkpoint_exactly(tmp_path: Path, uninterrupted) -> None:
    full = uninterrupted(3)
    shutil.copytree(full / "deepspeed" / "checkpoint-4", tmp_path / "deepspeed" / "checkpoint-4")
    _run(tmp_path, "resume", 3)
    _assert_same_weights(full / "deepspeed_full.safetensors", tmp_path / "deepspeed_resume.safetensors")


def test_trainer_pushes_zero2_checkpoints_and_resumes_from_the_hub_exactly(
    tmp_path: Path, uninterrupted, hub_repo_id, hub_api
) -> None:
    for mode in ("first", "resume"):
        _run(tmp_path, mode, 2, hub_repo_id)
    files = hub_api.list_repo_files(hub_repo_id)
    assert "last-checkpoint/optimizer.sharded.json" in files
    assert len([f for f in files if f.startswith("last-checkpoint/optimizer-shards-")]) == 2
    assert not [f for f in files if "global_step" in f]
    _assert_same_weights(
        uninterrupted(2) / "deepspeed_full.safetensors", tmp_path / "deepspeed_resume.safetensors"
    )
