"""scripts/demo.sh: its output-folder guard, its report stage (scripts/demo_report.py) and a short whole run.

The demo empties its output folder first: it must refuse folders that are not certainly its own. Each such case
runs the real script with an ``rm`` stand-in first on ``PATH`` that deletes nothing and fails, so even a broken
guard cannot delete anything here; the refusal must come before the virtualenv set-up (``_venv.sh``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integrations.scripts import load_script

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


# ---------------------------------------------------------------------------------------------------------------
# The report stage (scripts/demo_report.py): comparison and plot
# ---------------------------------------------------------------------------------------------------------------


def _load_report():
    return load_script("demo_report.py", "hf_optim_demo_report")


report = _load_report()


def synthetic_runs(n: int = 60, stop_at: int = 25):
    """A noisy loss (with spikes, the highest right after the resume point) and a warmup-cosine rate; the
    interrupted run's and the resumed run's values are the reference's."""
    steps = list(range(1, n + 1))
    loss = [0.7 - 0.4 * s / n + (0.25 if s % 11 == 0 else 0.03 * math.sin(s)) for s in steps]
    loss[stop_at + 1] = max(loss) + 0.05  # the highest loss just after the resume point, under its label
    lr = [min(s / 8, 0.5 * (1 + math.cos(math.pi * s / n))) * 1e-3 for s in steps]
    reference = report.Steps(steps, loss, lr)
    first = report.Steps(steps[:stop_at], loss[:stop_at], lr[:stop_at])
    resumed = report.Steps(steps[stop_at:], loss[stop_at:], lr[stop_at:])
    return reference, first, resumed


def test_report_compares_every_step():
    reference, first, resumed = synthetic_runs()
    assert report.compare_steps(reference, [first, resumed]) == (60, [])
    changed = report.Steps(resumed.step, list(resumed.loss), resumed.lr)
    changed.loss[3] += 1e-9  # step 29
    assert report.compare_steps(reference, [first, changed]) == (60, [29])
    missing = report.Steps(resumed.step[1:], resumed.loss[1:], resumed.lr[1:])  # step 26 never ran
    assert report.compare_steps(reference, [first, missing]) == (60, [26])


def test_report_plot_marks_the_resume_and_covers_no_curve():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tests.cli.test_list_plot import lines_crossing

    reference, first, resumed = synthetic_runs()
    planned = [min(t / 8, 0.5 * (1 + math.cos(math.pi * t / 60))) * 1e-3 for t in range(61)]
    figure = report.draw_runs(
        reference, first, resumed, stop_at=25, resumed_from="hf://user/repo/last-checkpoint", planned=planned
    )
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    ax_loss, ax_lr = figure.axes
    for ax, key in ((ax_loss, "loss"), (ax_lr, "lr")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        # the three runs, each with its own values; the resume point as a vertical line at step 25
        ref_line = lines["uninterrupted run (reference)"]
        first_line = lines["run interrupted after step 25"]
        resumed_line = lines["new process resumed from the Hub"]
        assert list(ref_line.get_xdata()) == reference.step
        assert list(ref_line.get_ydata()) == getattr(reference, key)
        assert list(first_line.get_xdata()) == first.step and list(resumed_line.get_xdata()) == resumed.step
        assert list(resumed_line.get_ydata()) == getattr(resumed, key)
        # drawn so that both stay visible on top of each other: solid vs dashed with markers
        assert ref_line.get_linestyle() == "-" and ref_line.get_marker() in ("None", None, "")
        assert resumed_line.get_linestyle() != "-" and resumed_line.get_marker() == "o"
        vertical = [line for line in ax.get_lines() if list(line.get_xdata()) == [25, 25]]
        assert len(vertical) == 1
    # the planned schedule: step s uses the rate after s - 1 scheduler steps
    planned_line = next(line for line in ax_lr.get_lines() if line.get_label() == "planned schedule")
    assert list(planned_line.get_xdata()) == list(range(1, 61))
    assert list(planned_line.get_ydata()) == planned[:-1]

    assert len(figure.legends) == 1 and all(ax.get_legend() is None for ax in figure.axes)
    label = next(t for t in ax_loss.texts if "resumed here" in t.get_text())
    assert "step 25" in label.get_text() and "hf://user/repo/last-checkpoint" in label.get_text()
    # the check can fail: the curves cross the axes' own box in the same coordinates
    assert lines_crossing(figure, ax_loss.get_window_extent(renderer))
    assert lines_crossing(figure, figure.legends[0].get_window_extent(renderer)) == []
    label_box = label.get_bbox_patch().get_window_extent(renderer)
    assert lines_crossing(figure, label_box) == []


# ---------------------------------------------------------------------------------------------------------------
# The whole demo, short
# ---------------------------------------------------------------------------------------------------------------


def _venv_is_warm() -> bool:
    """Whether scripts/_venv.sh would use .venv as it is (no creation, no install)."""
    stamp = ROOT / ".venv" / ".hf_optim-installed-dev"
    inputs = ("pyproject.toml", "hatch_build.py", "hf_optim/_autoload.py", "hf_optim_autoload.pth")
    return stamp.is_file() and all(
        not (ROOT / f).exists() or (ROOT / f).stat().st_mtime <= stamp.stat().st_mtime for f in inputs
    )


@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not _venv_is_warm(), reason="needs an installed, up-to-date .venv (scripts/test.sh makes one)"
)
def test_demo_runs_end_to_end_and_reports_plainly_without_a_terminal(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "STEPS": "6", "STOP_AT": "3", "WARMUP": "2"}
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "DEMO_REPO"):  # the local Hub server, not the caller's
        env.pop(name, None)
    result = subprocess.run(
        ["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=840, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    stdout = result.stdout
    assert "\r" not in stdout and "\033[" not in stdout  # no terminal: plain lines, no bold or redrawn lines
    assert ".venv ready (" in stdout
    # progress: a few step lines of each run, not all of them (every 2nd step of 6)
    lines = stdout.splitlines()
    assert [line.strip().split(":")[0] for line in lines if line.strip().startswith("step ")] == [
        "step 2/6",
        "step 4/6",
        "step 6/6",
        "step 2/6",
        "step 4/6",
        "step 6/6",
    ]
    assert "stopped after step 3 (simulated interruption)" in stdout
    assert "schedule from the checkpoint's scheduler.json" in stdout
    assert "identical at 6/6 steps (3 before the interruption, 3 after)" in stdout
    assert "bit-for-bit EQUAL to the uninterrupted run" in stdout
    assert re.search(r"total time +\d+ s", stdout)
    assert (out / "resume.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-step records the plot and the check come from
    first = [json.loads(line)["step"] for line in (out / "first" / "steps.jsonl").read_text().splitlines()]
    resumed = [
        json.loads(line)["step"] for line in (out / "resumed" / "steps.jsonl").read_text().splitlines()
    ]
    assert (first, resumed) == ([1, 2, 3], [4, 5, 6])
