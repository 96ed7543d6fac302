"""Accelerate's DeepSpeed plugin with ``hf_optim.use_safetensors_state``: ``accelerator.save_state`` under ZeRO-2 on
2 CPU processes writes the model's weights, hf_optim's per-process ZeRO state and the run state as safetensors +
JSON (no DeepSpeed pickles); ``accelerator.load_state`` resumes from it on the same processes and on one process
under ZeRO-3, ending where the uninterrupted run ends. Runs ``accelerate_zero_job.py`` under torchrun through
``cpu_launch.py`` (Accelerate's backend choice on CPU-only machines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.deepspeed.launch import launch

HERE = Path(__file__).resolve().parent


def _run(out: Path, world: int, mode: str, stage: int) -> None:
    launch(HERE / "accelerate_zero_job.py", [str(out), mode, str(stage), str(out / "checkpoint")], world)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps under ZeRO-2 on 2 processes, saved after step 4."""
    out = tmp_path_factory.mktemp("accelerate_zero")
    _run(out, 2, "train", 2)
    return out


def test_save_state_writes_safetensors_and_no_deepspeed_pickles(trained: Path) -> None:
    checkpoint = trained / "checkpoint"
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl")) or "global_step" in f], files
    assert {"model.safetensors", "optimizer.sharded.json", "random_states_0.safetensors"} <= set(files)
    manifest = json.loads((checkpoint / "optimizer.sharded.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["shards"]["files"]) == 2
    # the weights saved after step 4 are the engine's full weights (every parameter, its full shape)
    weights = load_file(checkpoint / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "0.weight": (16, 8),
        "0.bias": (16,),
        "2.weight": (4, 16),
        "2.bias": (4,),
    }


@pytest.mark.parametrize(("world", "stage"), [(2, 2), (1, 3)], ids=["zero2-on-2", "zero3-on-1"])
def test_load_state_resumes_where_the_uninterrupted_run_ends(trained: Path, world: int, stage: int) -> None:
    _run(trained, world, "resume", stage)
    full = load_file(trained / "train-zero2-2.safetensors")
    resumed = load_file(trained / f"resume-zero{stage}-{world}.safetensors")
    assert full.keys() == resumed.keys() and full
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6 if world != 2 else 0)
