"""Launch each two-process entry point many times in a row and count the runs that hang or fail.

A gloo process group torn down by interpreter exit, while something (a DDP reducer, an FSDP2 device mesh) still
holds it, can wait forever for its threads; it happens in a few runs out of a hundred, so one run proves nothing.
This script runs each entry point ``--runs`` times with a deadline per run and prints a table::

    python scripts/check_exit_hangs.py                       # 100 runs of every entry point
    python scripts/check_exit_hangs.py --runs 20 --only accelerate fsdp

A run that is still alive at its deadline counts as a hang (its process tree is killed); a run that exits
non-zero counts as a failure. Runs are sequential: the figures mean something only on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(out: str) -> list[str]:
    """The two-process ``accelerate launch`` run of tests/integrations/test_accelerate_multiprocess.py."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "scripts/train_accelerate.py", "--cpu", "--output_dir", out,
        "--per_device_train_batch_size", "2", "--save_steps", "4", "--num_samples", "36", "--seq_len", "12",
        "--vocab_size", "24", "--hidden_size", "16", "--seed", "3", "--optim", "adamw_hf",
        "--lr_scheduler_type", "linear", "--learning_rate", "0.01", "--weight_decay", "0.1",
        "--num_warmup_steps", "2", "--max_steps", "6", "--gradient_accumulation_steps", "2",
    ]  # fmt: skip


def _fsdp(out: str) -> list[str]:
    """``scripts/train_fsdp.py`` under ``torchrun --nproc_per_node 2``, as the demo and its test run it."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "scripts/train_fsdp.py", "--output_dir", out,
        "--max_steps", "4", "--save_steps", "2",
    ]  # fmt: skip


def _test_worker(out: str) -> list[str]:
    """The accelerate test worker (tests/integrations/test_accelerate_multiprocess.py run as a script)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "tests/integrations/test_accelerate_multiprocess.py",
        "--cpu", out,
    ]  # fmt: skip


def _sharded_worker(out: str) -> list[str]:
    """A spawned FSDP2 test worker: tests/state/test_sharded.py's save job, through tests/multiprocess.py."""
    code = (
        "import sys; from tests.multiprocess import run_with_deadline; "
        "from tests.state.test_sharded import _worker; "
        "run_with_deadline(_worker, 2, ('save', sys.argv[1]), sys.argv[1], 'save', 120)"
    )
    return [sys.executable, "-c", code, out]


ENTRY_POINTS: dict[str, Callable[[str], list[str]]] = {
    "accelerate": _accelerate,
    "accelerate-test-worker": _test_worker,
    "fsdp": _fsdp,
    "sharded-test-worker": _sharded_worker,
}


def _run_once(command: list[str], deadline: float) -> str:
    """``"ok"``, ``"failed (rc)"`` or ``"hang"`` for one run of ``command``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hang"
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"failed ({proc.returncode}): {tail[0][:120]}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per entry point (default 100)")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds before a run counts as hung")
    parser.add_argument("--only", nargs="+", choices=sorted(ENTRY_POINTS), help="entry points to run")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or ENTRY_POINTS:
        hangs = failures = 0
        started = time.monotonic()
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="hf-optim-exit-") as out:
                outcome = _run_once(ENTRY_POINTS[name](out), args.deadline)
            if outcome == "hang":
                hangs += 1
            elif outcome != "ok":
                failures += 1
            if outcome != "ok":
                print(f"{name} run {i + 1}: {outcome}", flush=True)
        rows.append((name, args.runs, hangs, failures, (time.monotonic() - started) / args.runs))
        print(f"{name}: {hangs} hangs, {failures} failures in {args.runs} runs", flush=True)
    print("\n| entry point | runs | hangs | failures | s/run |\n|---|---|---|---|---|")
    for name, runs, hangs, failures, per_run in rows:
        print(f"| {name} | {runs} | {hangs} | {failures} | {per_run:.1f} |")
    return 1 if any(r[2] or r[3] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
