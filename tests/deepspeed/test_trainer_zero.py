"""hf_optim.Trainer under DeepSpeed ZeRO (2 CPU processes, gloo): a ZeRO-2 run's checkpoints hold hf_optim's
safetensors ZeRO state and no DeepSpeed pickles, locally and as pushed to the Hub; a new run under ZeRO-3 resumes
from the pushed checkpoint 4, ends where the uninterrupted run ends (to float32 rounding: the stages may sum
gradients in another order) and saves its own checkpoint 8 the same way. Runs ``scripts/gpu_check_deepspeed.py``
(the GPU check) through ``cpu_launch.py``, the tests' patch of Accelerate's backend choice on CPU-only machines."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.deepspeed.launch import launch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check_deepspeed.py"


def _assert_zero_checkpoint(checkpoint: Path, stage: int) -> None:
    """hf_optim's ZeRO state of ``stage`` from 2 processes, and no DeepSpeed pickles."""
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.sharded.json" in names and not [n for n in names if n.startswith("global_step")], names
    manifest = json.loads((checkpoint / "optimizer.sharded.json").read_text())
    assert manifest["zero"]["stage"] == stage and manifest["world_size"] == 2
    # training_args.bin: transformers' own record of the arguments, written and never read back
    assert [p.name for p in checkpoint.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")] == [
        "training_args.bin"
    ]


def test_trainer_pushes_zero2_checkpoints_and_resumes_under_zero3_from_the_hub(
    tmp_path: Path, hub_repo_id: str, hub_api
) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(SCRIPT, [str(full), "full", "2", hub_repo_id], 2)
    checkpoint = full / "deepspeed" / "checkpoint-4"
    _assert_zero_checkpoint(checkpoint, 2)
    files = hub_api.list_repo_files(hub_repo_id)
    assert "checkpoint-4/optimizer.sharded.json" in files
    assert len([f for f in files if f.startswith("checkpoint-4/optimizer-shards-")]) == 2
    assert not [f for f in files if "global_step" in f]

    launch(SCRIPT, [str(resumed), "resume", "3", hub_repo_id], 2)
    # it started at step 4: a run from scratch would also have saved checkpoint 4
    assert sorted(p.name for p in (resumed / "deepspeed").iterdir()) == ["checkpoint-8"]
    _assert_zero_checkpoint(resumed / "deepspeed" / "checkpoint-8", 3)
    expected = load_file(full / "deepspeed_full.safetensors")
    got = load_file(resumed / "deepspeed_resume.safetensors")
    at_save = load_file(checkpoint / "model.safetensors")
    assert expected.keys() == got.keys() and expected
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(expected[k], at_save[k]) for k in at_save)  # the resumed steps did train
    # the weights a ZeRO-3 checkpoint holds are the gathered full weights
    saved = load_file(resumed / "deepspeed" / "checkpoint-8" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], got[k]) for k in saved)
