"""hf_optim.Trainer under DeepSpeed ZeRO-2 and ZeRO-3 (2 CPU processes, gloo): checkpoints hold hf_optim's
safetensors ZeRO state and no DeepSpeed pickles, locally and as pushed to the Hub; resuming from checkpoint 4 of
the uninterrupted run (ZeRO-3 from its folder, ZeRO-2 from the Hub) ends bit for bit where that run ends. Runs
``scripts/gpu_check_deepspeed.py`` (the GPU check) through ``cpu_launch.py``, the tests' patch of Accelerate's
backend choice on CPU-only machines."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.deepspeed.launch import launch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check_deepspeed.py"


def _run(out: Path, mode: str, stage: int, *repo: str) -> None:
    launch(SCRIPT, [str(out), mode, str(stage), *repo], 2)


def _assert_checkpoint_is_safetensors(checkpoint: Path) -> None:
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.sharded.json" in names and not [n for n in names if n.startswith("global_step")]
    # training_args.bin: transformers' own record of the arguments, written and never read back
    pickles = [p.name for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    assert pickles == ["training_args.bin"]


def _assert_same_weights(expected: Path, resumed: Path) -> None:
    full, got = load_file(expected), load_file(resumed)
    assert full.keys() == got.keys() and full
    for key, value in full.items():
        assert torch.equal(got[key], value), key


def test_trainer_resumes_a_local_zero3_checkpoint_exactly(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, "full", 3)
    _assert_checkpoint_is_safetensors(full / "deepspeed" / "checkpoint-4")
    shutil.copytree(full / "deepspeed" / "checkpoint-4", resumed / "deepspeed" / "checkpoint-4")
    _run(resumed, "resume", 3)
    _assert_same_weights(full / "deepspeed_full.safetensors", resumed / "deepspeed_resume.safetensors")


def test_trainer_pushes_zero2_checkpoints_and_resumes_from_the_hub_exactly(
    tmp_path: Path, hub_repo_id: str, hub_api
) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, "full", 2, hub_repo_id)
    _assert_checkpoint_is_safetensors(full / "deepspeed" / "checkpoint-4")
    files = hub_api.list_repo_files(hub_repo_id)
    assert "checkpoint-4/optimizer.sharded.json" in files
    assert len([f for f in files if f.startswith("checkpoint-4/optimizer-shards-")]) == 2
    assert not [f for f in files if "global_step" in f]
    _run(resumed, "resume", 2, hub_repo_id)
    _assert_same_weights(full / "deepspeed_full.safetensors", resumed / "deepspeed_resume.safetensors")
