"""``hf-optim plot``: draw learning-rate schedules, as a PNG (matplotlib) or as a text plot in the terminal.

Several schedules can be compared on one figure; each ``SCHEDULE`` is a registered name, or one of
pytorch-pretrained-bert's ``BertAdam(schedule=...)`` names (``warmup_linear``, ``warmup_cosine``,
``warmup_constant``, ``none``: their warmup is ``--num-warmup-steps`` / ``--num-training-steps``), optionally
followed by its own arguments (``cosine_with_restarts:num_cycles=3``). ``--arg key=value`` goes to every schedule that takes
``key``. Values are read as JSON (numbers, ``true``, ``null``, ...) and otherwise kept as strings.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hf_optim.schedules.pretrained_bert import LRSchedule

logger = logging.getLogger(__name__)

_MARKERS = "*o+x#@%&"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot learning-rate schedules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "schedules",
        nargs="+",
        metavar="SCHEDULE",
        help="registered schedule name, optionally name:key=value,...",
    )
    parser.add_argument("--num-warmup-steps", type=int, default=0, help="warmup steps (default: 0)")
    parser.add_argument("--num-training-steps", type=int, required=True, help="steps to draw (and to train)")
    parser.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="extra schedule argument (repeatable)"
    )
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default: 5e-5)")
    parser.add_argument("--output", "-o", help="write the figure here with matplotlib (png, svg, pdf, ...)")
    parser.add_argument("--width", type=int, default=60, help="text plot width in characters (default: 60)")
    parser.add_argument("--height", type=int, default=12, help="text plot height in lines (default: 12)")
    parser.add_argument(
        "--json", action="store_true", help="print the learning rates as JSON instead of a plot"
    )
    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(item: str, where: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{where}: expected KEY=VALUE, got {item!r}")
    return key.strip(), _value(value.strip())


def parse_schedule(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": v, "k2": v2})``."""
    name, _, rest = spec.partition(":")
    kwargs = dict(_key_value(item, f"SCHEDULE {spec!r}") for item in rest.split(",") if item.strip())
    return name.strip(), kwargs


def _legacy(name: str) -> type[LRSchedule] | None:
    """pytorch-pretrained-bert's schedule class for ``name``, unless the registry has a schedule of that name."""
    from hf_optim import registry
    from hf_optim.schedules.pretrained_bert import SCHEDULES as LEGACY_SCHEDULES

    if name in registry.list_schedulers():
        return None
    return LEGACY_SCHEDULES.get(name)


def _factory(name: str) -> Any:
    """What builds the schedule ``name``: the legacy class or the registry's factory (an unknown name raises
    ``ValueError`` with the closest names)."""
    from hf_optim import registry

    legacy = _legacy(name)
    return legacy if legacy is not None else registry.get_scheduler_info(name).factory


def _accepts(name: str, key: str) -> bool:
    factory = _factory(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    if key in params:
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------------------------------------------
# Learning rates
# ----------------------------------------------------------------------------------------------------------------


def schedule_lrs(
    name: str, *, lr: float, num_warmup_steps: int, num_training_steps: int, kwargs: dict[str, Any]
) -> list[float]:
    """The learning rate at steps ``0..num_training_steps`` of the registered schedule ``name``."""
    if num_training_steps < 1:
        raise ValueError(f"--num-training-steps must be at least 1, got {num_training_steps}")
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from hf_optim import registry

    legacy = _legacy(name)
    if legacy is not None:  # a fraction of t_total, as BertAdam(warmup=..., t_total=...) takes it
        schedule = legacy(warmup=num_warmup_steps / num_training_steps, t_total=num_training_steps, **kwargs)
        return [float(lr * schedule.get_lr(step, nowarn=True)) for step in range(num_training_steps + 1)]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = registry.create_scheduler(name, optimizer, num_warmup_steps, num_training_steps, **kwargs)
    if type(scheduler) is LambdaLR:  # lr = base_lr * lambda(step), exactly what LambdaLR computes
        base, fn = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
        return [float(base * fn(step)) for step in range(num_training_steps + 1)]
    lrs = [float(scheduler.get_last_lr()[0])]
    for _ in range(num_training_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(float(scheduler.get_last_lr()[0]))
    return lrs


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def text_plot(curves: dict[str, list[float]], *, width: int = 60, height: int = 12) -> str:
    """A compact ASCII chart of one or more curves sharing the x axis (steps) and y axis (learning rate).

    Each column covers a range of steps and marks every row between the lowest and highest value in it, so
    sudden drops (restarts) show as vertical strokes.
    """
    if width < 10 or height < 3:
        raise ValueError(f"text plot needs width >= 10 and height >= 3, got {width}x{height}")
    values = [v for lrs in curves.values() for v in lrs]
    lo, hi = min(*values, 0.0), max(values)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError("cannot plot non-finite learning rates")
    if hi == lo:
        hi = lo + 1.0
    n = max(len(lrs) for lrs in curves.values())
    width = min(width, n)
    grid = [[" "] * width for _ in range(height)]

    def row(value: float) -> int:
        return height - 1 - round((value - lo) / (hi - lo) * (height - 1))

    markers = list(zip(_MARKERS * len(curves), curves.values(), strict=False))
    for marker, lrs in reversed(markers):  # the first schedule is drawn last, on top
        for col in range(width):
            start = col * len(lrs) // width
            stop = max(start + 1, (col + 1) * len(lrs) // width)
            chunk = lrs[start:stop]
            for r in range(row(max(chunk)), row(min(chunk)) + 1):
                grid[r][col] = marker

    labels = {0: f"{hi:.3g}", height // 2: f"{(lo + hi) / 2:.3g}", height - 1: f"{lo:.3g}"}
    pad = max(len(s) for s in labels.values())
    lines = [f"{labels.get(r, ''):>{pad}} |{''.join(cells)}".rstrip() for r, cells in enumerate(grid)]
    lines.append(f"{'':>{pad}} +{'-' * width}")
    last = str(n - 1)
    lines.append(f"{'':>{pad}}  0{last:>{width - 1}}  step")
    legend = "   ".join(f"{m} {label}" for m, label in zip(_MARKERS * len(curves), curves, strict=False))
    lines.append(f"{'':>{pad}}  {legend}")
    return "\n".join(lines)


def draw_figure(curves: dict[str, list[float]], *, num_warmup_steps: int, lr: float) -> Figure:
    """The curves as a matplotlib ``Figure`` (no pyplot, so no GUI backend or global state).

    The legend goes below the axes, outside them, so it never covers a curve; the y axis leaves 5% headroom above
    the highest rate so that peaks do not merge into the frame.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, lrs in curves.items():
        ax.plot(range(len(lrs)), lrs, label=label, linewidth=1.6)
    if num_warmup_steps:
        ax.axvline(num_warmup_steps, color="0.6", linestyle=":", linewidth=1, label="end of warmup")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"learning-rate schedule (peak lr {lr:g})")
    ax.set_xlim(0, max(len(lrs) for lrs in curves.values()) - 1)
    low = min(0.0, *(min(lrs) for lrs in curves.values()))
    high = max(max(lrs) for lrs in curves.values())
    ax.set_ylim(low, high + 0.05 * (high - low) if high > low else low + 1.0)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), frameon=False)
    return fig


def save_figure(curves: dict[str, list[float]], output: str, *, num_warmup_steps: int, lr: float) -> None:
    """Draw the curves (:func:`draw_figure`) into ``output`` (png, svg, pdf, ...: from its extension)."""
    draw_figure(curves, num_warmup_steps=num_warmup_steps, lr=lr).savefig(output, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    specs = [parse_schedule(spec) for spec in args.schedules]
    shared = dict(_key_value(item, "--arg") for item in args.arg)
    for name, _ in specs:
        _factory(name)
    for key in shared:
        if not any(_accepts(name, key) for name, _ in specs):
            raise ValueError(f"--arg {key}: no schedule among {', '.join(n for n, _ in specs)} takes {key!r}")

    curves: dict[str, list[float]] = {}
    for (name, own), spec in zip(specs, args.schedules, strict=True):
        kwargs = {k: v for k, v in shared.items() if _accepts(name, k)}
        kwargs.update(own)
        label = spec if spec not in curves else f"{spec} ({len(curves) + 1})"
        curves[label] = schedule_lrs(
            name,
            lr=args.lr,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=args.num_training_steps,
            kwargs=kwargs,
        )

    if args.json:
        print(json.dumps({"lr": args.lr, "curves": curves}))
        return 0
    if args.output:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                f"hf-optim plot: matplotlib is not installed (pip install 'hf_optim[plot]'), {args.output} was not "
                "written; text plot instead:",
                file=sys.stderr,
            )
        else:
            save_figure(curves, args.output, num_warmup_steps=args.num_warmup_steps, lr=args.lr)
            logger.info("wrote %s", args.output)
            return 0
    print(text_plot(curves, width=args.width, height=args.height))
    return 0
