"""scripts/train_deepspeed.py: ZeRO-2 on 2 CPU processes saves its state; resuming in one process under ZeRO-3
ends where the uninterrupted run ends, to float32 rounding (the gradient reductions differ)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.deepspeed.launch import launch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_deepspeed.py"


def _run(tmp: Path, nproc: int | None, out: str, *args: str) -> str:
    return launch(SCRIPT, ["--output_dir", str(tmp / out), "--max_steps", "6", *args], nproc, cwd=tmp)


def test_save_under_zero2_on_two_resume_under_zero3_in_one_process(tmp_path: Path) -> None:
    full = _run(tmp_path, 2, "full", "--zero_stage", "2", "--save_steps", "3")
    assert "saved" in full and (tmp_path / "full" / "checkpoint-3" / "optimizer.sharded.json").is_file()
    resumed = _run(
        tmp_path,
        None,
        "resumed",
        "--zero_stage",
        "3",
        "--resume_from_checkpoint",
        str(tmp_path / "full" / "checkpoint-3"),
    )
    assert "resumed from" in resumed and "at step 3" in resumed
    expected = load_file(tmp_path / "full" / "final_model.safetensors")
    got = load_file(tmp_path / "resumed" / "final_model.safetensors")
    at_save = load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(expected[k], at_save[k]) for k in expected)  # the resumed steps did train
