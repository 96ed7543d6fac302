"""hf_optim.Trainer under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, gloo): checkpoints hold hf_optim's
safetensors ZeRO state and no DeepSpeed pickles; resuming from one ends bit for bit where the uninterrupted run
ends. Runs ``scripts/gpu_check_deepspeed.py`` (the GPU check) through ``accelerate_gloo.py``, the documented
patch of Accelerate's backend choice on CPU-only machines."""

from __future__ import annotations

import os
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
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, torch.Tensor]]:
    """The final weights of the uninterrupted run under ZeRO stage ``stage``, run once per test run."""

    def weights(stage: int) -> dict[str, torch.Tensor]:
        out = once_per_run(
            tmp_path_factory, f"trainer-zero{stage}-uninterrupted", lambda o: _run(o, "full", stage)
        )
        return load_file(out / "deepspeed_full.safetensors")

    return weights


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_checkpoints_zero_state_in_safetensors_and_resumes_exactly(
    tmp_path: Path, uninterrupted, stage: int
) -> None:
    for mode in ("first", "resume"):
        _run(tmp_path, mode, stage)
    checkpoint = tmp_path / "deepspeed" / "checkpoint-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.sharded.json" in names and not [n for n in names if n.startswith("global_step")]
    # training_args.bin: transformers' own record of the arguments, written and never read back
    pickles = [p.name for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    assert pickles == ["training_args.bin"]
    full = uninterrupted(stage)
    resumed = load_file(tmp_path / "deepspeed_resume.safetensors")
    assert full.keys() == resumed.keys() and full
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


def test_trainer_pushes_checkpoints_and_resumes_from_the_hub(
    tmp_path: Path, uninterrupted, hub_repo_id, hub_api
) -> None:
    for mode in ("first", "resume"):
        _run(tmp_path, mode, 2, hub_repo_id)
    files = hub_api.list_repo_files(hub_repo_id)
    assert "last-checkpoint/optimizer.sharded.json" in files
    assert len([f for f in files if f.startswith("last-checkpoint/optimizer-shards-")]) == 2
    assert not [f for f in files if "global_step" in f]
    full = uninterrupted(2)
    resumed = load_file(tmp_path / "deepspeed_resume.safetensors")
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key
