"""scripts/demo.sh empties its output folder first: it must refuse folders that are not certainly its own.

Each case runs the real script with an ``rm`` stand-in first on ``PATH`` that deletes nothing and fails, so even
a broken guard cannot delete anything here; the refusal must come before the virtualenv set-up (``_venv.sh``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.sh"


def run_demo(out: str, tmp_path: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_rm = bin_dir / "rm"
    fake_rm.write_text('#!/bin/sh\necho "rm stand-in called: $*" >&2\nexit 97\n')
    fake_rm.chmod(0o755)
    env = {**os.environ, "OUT": out, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("out", "reason"),
    [("", "it is empty"), ("/", "it is /"), (".", f"it is {ROOT.resolve()}")],
    ids=["empty", "root", "repository"],
)
def test_demo_refuses_to_delete_a_dangerous_out(tmp_path, out, reason):
    result = run_demo(out, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"demo.sh: refusing to delete OUT={out}: {reason}" in result.stderr
    assert "rm stand-in called" not in result.stderr


def test_demo_refuses_a_foreign_folder_outside_the_repository(tmp_path):
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_demo(str(mine), tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"refusing to delete OUT={mine}" in result.stderr
    assert "holds no .hf_optim-demo-output" in result.stderr
    assert "rm stand-in called" not in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
