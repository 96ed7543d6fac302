"""Launching a DeepSpeed script on CPU processes for a test: under ``torchrun`` or as one plain process, through
``cpu_launch.py``, one thread per process; its output returned, and shown when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.multiprocess import free_port

HARNESS = Path(__file__).resolve().parent / "cpu_launch.py"


def launch(
    script: Path, args: list[str], nproc: int | None, *, cwd: Path | None = None, timeout: float = 300
) -> str:
    """``script ARGS`` on ``nproc`` processes under torchrun, or in one plain ``python`` process (``None``); its
    standard output."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [*cmd, str(HARNESS), str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
