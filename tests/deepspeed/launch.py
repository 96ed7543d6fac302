"""Launching a DeepSpeed script on CPU processes for a test: under ``torchrun`` or as one plain process, through
``cpu_launch.py``, one thread per process; its output returned, and shown when it fails. A launch still running
after its timeout is killed with every process it started (torchrun's workers included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.multiprocess import free_port

HARNESS = Path(__file__).resolve().parent / "cpu_launch.py"


def launch(
    script: Path, args: list[str], nproc: int | None, *, cwd: Path | None = None, timeout: float = 240
) -> str:
    """``script ARGS`` on ``nproc`` processes under torchrun, or in one plain ``python`` process (``None``); its
    standard output."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    process = subprocess.Popen(
        [*cmd, str(HARNESS), str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,  # its own process group: a timeout kills the workers too
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}") from None
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout
