"""Run many ``hf-optim`` command lines in ONE Python process, each as the command line would run it: in its own
working directory, with its own stdout and stderr (file descriptors 1 and 2 redirected, so loggers that hold the
original stream are captured too). An exception that escapes ``main`` is written to that job's stderr as the
interpreter would print it (a ``Traceback``), with exit code 1.

    python -m tests.security.cli_batch JOBS.json RESULTS.json

JOBS.json: a list of ``{"cwd": ..., "argv": [...]}``; RESULTS.json: a list of ``{"code", "stdout", "stderr"}``.
``run_batch`` starts it from a test with a deadline (a job that hangs fails every job of the batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


def _run_one(cwd: str, argv: list[str]) -> dict:
    from hf_optim.cli.main import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        here = os.getcwd()
        try:
            os.chdir(cwd)
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(here)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {
            "code": code,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def run_batch(jobs: list[dict], folder: Path, timeout: float) -> list[dict]:
    """Run ``jobs`` in one subprocess (this interpreter and path); the results in the same order."""
    jobs_file, results_file = folder / "jobs.json", folder / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.security.cli_batch", str(jobs_file), str(results_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0 and results_file.exists(), done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(results_file.read_text())


if __name__ == "__main__":
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = [_run_one(job["cwd"], job["argv"]) for job in jobs]
    Path(sys.argv[2]).write_text(json.dumps(results))
