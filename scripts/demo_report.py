#!/usr/bin/env python
"""The last stage of ``scripts/demo.sh``: compare the runs, plot them and print a summary.

Reads what the demo's three training processes wrote under ``OUT``: ``uninterrupted/`` (the reference),
``first/`` (stopped after ``--stop-at`` steps, checkpoints pushed to the Hub) and ``resumed/`` (a new process
that resumed from the Hub). Each holds ``steps.jsonl`` (``train_trainer.py --step_log``: step, loss, learning
rate of every step that process ran) and, when it finished, ``model.safetensors``.

Checks, each against the uninterrupted run: final weights equal bit for bit, and loss and learning rate equal at
every step (the interrupted run's steps before the interruption, the resumed process's after it). Draws
``OUT/resume.png`` (loss and learning rate of both runs, resume point marked; needs matplotlib) and exits with 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RUNS = ("uninterrupted", "first", "resumed")


@dataclass
class Steps:
    """Per-step values of one training process, in step order."""

    step: list[int]
    loss: list[float]
    lr: list[float]


def read_steps(path: str) -> Steps:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    records.sort(key=lambda r: r["step"])
    return Steps(
        [r["step"] for r in records], [r["loss"] for r in records], [r["learning_rate"] for r in records]
    )


def compare_steps(reference: Steps, pieces: list[Steps]) -> tuple[int, list[int]]:
    """(number of steps compared, steps where loss or learning rate differ or are missing)."""
    want = {s: (loss, lr) for s, loss, lr in zip(reference.step, reference.loss, reference.lr, strict=True)}
    got = {}
    for piece in pieces:
        got.update({s: (loss, lr) for s, loss, lr in zip(piece.step, piece.loss, piece.lr, strict=True)})
    differing = sorted(s for s in want.keys() | got.keys() if want.get(s) != got.get(s))
    return len(want), differing


def draw_runs(
    reference: Steps,
    first: Steps,
    resumed: Steps,
    *,
    stop_at: int,
    resumed_from: str,
    planned: list[float] | None = None,
    planned_label: str = "planned schedule",
    title: str = "",
) -> Figure:
    """Loss (top) and learning rate (bottom) per step: the uninterrupted run as solid lines, the interrupted run
    and the resumed process dashed with markers on top of them, the resume point as a vertical line. The legend
    sits below the axes, so it never covers a curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    every = max(1, len(reference.step) // 40)
    dashed = {"linestyle": (0, (4, 3)), "linewidth": 1.3, "marker": "o", "markersize": 4, "markevery": every}
    dashed["markerfacecolor"] = "none"
    if planned is not None:  # planned[s] is the rate after s scheduler steps, the one step s + 1 uses
        ax_lr.plot(
            range(1, len(planned)),
            planned[:-1],
            color="0.8",
            linewidth=6,
            solid_capstyle="butt",
            label=planned_label,
        )
    for ax, key in ((ax_loss, "loss"), (ax_lr, "lr")):
        ax.plot(
            reference.step,
            getattr(reference, key),
            color="C0",
            linewidth=2.2,
            label="uninterrupted run (reference)",
        )
        ax.plot(
            first.step,
            getattr(first, key),
            color="C1",
            label=f"run interrupted after step {stop_at}",
            **dashed,
        )
        ax.plot(
            resumed.step,
            getattr(resumed, key),
            color="C3",
            label="new process resumed from the Hub",
            **dashed,
        )
        ax.axvline(stop_at, color="0.25", linestyle=":", linewidth=1.2)
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("training loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylim(bottom=0)
    last = max(reference.step[-1], resumed.step[-1] if resumed.step else 0)
    ax_lr.set_xlim(0, last + 1)
    # the resume point's label, in the loss axes: data x, axes y (top), clear of the curves' area
    ax_loss.annotate(
        f"resumed here (step {stop_at})\nfrom {resumed_from}",
        xy=(stop_at, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(6, -4),
        textcoords="offset points",
        va="top",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
    )
    low, high = ax_loss.get_ylim()
    ax_loss.set_ylim(low, high + 0.35 * (high - low))  # headroom for the label above the curves
    if title:
        fig.suptitle(title)
    handles, labels = ax_lr.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    return fig


def shown(path: str) -> str:
    """``path`` relative to the working directory when it is below it (shorter lines in the summary)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="the demo's output folder")
    parser.add_argument("--repo", required=True, help="the Hub repository the checkpoints were pushed to")
    parser.add_argument("--hub", required=True, help="which Hub (for the summary)")
    parser.add_argument("--stop-at", type=int, required=True, help="the step the first run stopped after")
    parser.add_argument("--schedule", required=True, help="NAME:WARMUP:STEPS:LR, the planned schedule")
    args = parser.parse_args(argv)

    import torch
    from huggingface_hub import HfApi
    from safetensors.torch import load_file

    out = args.out
    steps = {run: read_steps(os.path.join(out, run, "steps.jsonl")) for run in RUNS}
    ref, res = (
        load_file(os.path.join(out, run, "model.safetensors")) for run in ("uninterrupted", "resumed")
    )
    same_weights = ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)
    before = steps["first"]  # stopped after --stop-at: every step of it precedes the interruption
    compared, differing = compare_steps(steps["uninterrupted"], [before, steps["resumed"]])

    api = HfApi()
    pushed = sorted(
        f.removeprefix("last-checkpoint/")
        for f in api.list_repo_files(args.repo)
        if f.startswith("last-checkpoint/")
    )
    with open(api.hf_hub_download(args.repo, "last-checkpoint/trainer_state.json"), encoding="utf-8") as f:
        pushed_step = json.load(f)["global_step"]
    resumed_from = f"hf://{args.repo}/last-checkpoint"

    name, warmup, total, lr = args.schedule.split(":")
    plot_path = os.path.join(out, "resume.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_line = (
            "not drawn: matplotlib is not installed (pip install matplotlib, or pip install 'hf_optim[plot]')"
        )
    else:
        from hf_optim.cli.plot_cmd import schedule_lrs

        planned = schedule_lrs(
            name, lr=float(lr), num_warmup_steps=int(warmup), num_training_steps=int(total), kwargs={}
        )
        verdict = "identical" if not differing else f"DIFFERENT at {len(differing)} steps"
        figure = draw_runs(
            steps["uninterrupted"],
            before,
            steps["resumed"],
            stop_at=args.stop_at,
            resumed_from=resumed_from,
            planned=planned,
            planned_label=f"planned: {name}, warmup {warmup}, {total} steps (hf-optim plot)",
            title=f"hf_optim: interrupted at step {args.stop_at} and resumed from the Hub: {verdict} to the "
            "uninterrupted run",
        )
        figure.savefig(plot_path, dpi=110)
        plot_line = shown(plot_path)

    ref_steps = steps["uninterrupted"]
    files = ", ".join(pushed)
    pickled = sorted(set(pushed) & {"optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin"})
    per_step = (
        f"{'identical' if not differing else 'DIFFERENT'} at {compared - len(differing)}/{compared} steps "
        f"({len(before.step)} before the interruption, {len(steps['resumed'].step)} after)"
    )
    if differing:
        per_step += f"; first difference at step {differing[0]}"
    rows = [
        ("reference run", f"{ref_steps.step[-1]} steps without interruption"),
        (
            "interrupted run",
            f"stopped after step {args.stop_at}, checkpoint pushed to {args.repo}/last-checkpoint",
        ),
        ("pushed checkpoint", files),
        (
            "pickled optimizer",
            ", ".join(pickled) if pickled else "none (optimizer.safetensors + scheduler.json)",
        ),
        (
            "resumed run",
            f"new process, empty cache: {resumed_from} (step {pushed_step}) -> step {steps['resumed'].step[-1]}, "
            "schedule from its scheduler.json",
        ),
        ("Hub", args.hub),
        ("loss and lr per step", per_step),
        (
            "final weights",
            f"{'bit-for-bit EQUAL' if same_weights else 'DIFFERENT'} to the uninterrupted run ({len(ref)} tensors)",
        ),
        ("training loss", f"{ref_steps.loss[0]:.3f} at step 1 -> {ref_steps.loss[-1]:.3f} at the last step"),
        ("plot", plot_line),
        ("logs", f"{shown(out)}/*.log, per-step values in {shown(out)}/*/steps.jsonl"),
    ]
    print("Summary")
    for key, value in rows:
        print(f"  {key:<22} {value}")
    return 0 if same_weights and not differing else 1


if __name__ == "__main__":
    sys.exit(main())
