"""``hf-optim inspect``: describe a saved optimizer state (local directory, Hub repo or hf:// URL) without a model.

Reads only metadata, tensor headers and the step counters: optimizer class, parameter groups with their
hyperparameters, parameter count, state size, step, schedule name and current learning rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any

from hf_optim.cli import printable

if TYPE_CHECKING:
    from hf_optim.state import ShardedStateInfo, StateInfo


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="describe saved optimizer / scheduler state",
        description="Describe optimizer state saved by hf_optim (a local directory, a Hub repo id or an hf:// "
        "URL) from its metadata and tensor headers; no model needed.",
    )
    parser.add_argument("path_or_repo_id", metavar="PATH_OR_REPO_ID", help="directory, repo id or hf:// URL")
    parser.add_argument("--revision", help="Hub branch, tag or commit")
    parser.add_argument("--subfolder", help="folder inside the directory or repository")
    parser.add_argument("--token", help="Hub token (default: the stored one / HF_TOKEN)")
    parser.add_argument("--repo-type", choices=("model", "dataset", "space"), help="Hub repository type")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: the usual one)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never download")
    parser.add_argument("--force-download", action="store_true", help="download again even if cached")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


#: widest line the tables aim for; param groups print one after the other rather than side by side beyond it
MAX_WIDTH = 100


def _size(num_bytes: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes} B"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_value(v) for v in value) + ")"
    return str(value)


def _jsonable(value: Any) -> Any:
    """``value`` with dictionary keys JSON cannot hold (tuples, ...) written as their ``repr`` and tuples as
    lists, so that any decoded hyperparameter prints."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _table(rows: list[list[str]]) -> list[str]:
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _step(step: tuple[float, float] | None) -> str:
    if step is None:
        return "-"
    low, high = step
    return _value(high) if low == high else f"{_value(low)} .. {_value(high)}"


def _schedule(info: StateInfo | ShardedStateInfo) -> str:
    if info.scheduler_class is None and info.scheduler_name is None:
        return "-"
    lr = ", ".join(_value(v) for v in info.scheduler_lr) if info.scheduler_lr else "-"
    return (
        f"{info.scheduler_name or '(unnamed)'} ({info.scheduler_class or 'unknown class'}), "
        f"step {info.scheduler_step}, lr {lr}"
    )


def _groups(param_groups: tuple[dict[str, Any], ...]) -> list[str]:
    """The param groups side by side, or one after the other when that would be wider than ``MAX_WIDTH``."""
    if not param_groups:
        return []
    keys: list[str] = []
    for group in param_groups:
        keys += [k for k in group["hyperparameters"] if k not in keys]
    columns = [
        [str(g["num_params"]), f"{g['numel']:,}", *(_value(g["hyperparameters"].get(k, "-")) for k in keys)]
        for g in param_groups
    ]
    labels = ["parameters", "elements", *keys]
    header = ["", *(f"group {i}" for i in range(len(columns)))]
    table = _table([header, *map(list, zip(labels, *columns, strict=True))])
    if max(map(len, table)) > MAX_WIDTH:
        table = []
        for i, column in enumerate(columns):
            table += [""] * bool(i) + _table(
                [[f"group {i}", ""], *map(list, zip(labels, column, strict=True))]
            )
    return ["", *table]


def format_info(info: StateInfo) -> str:
    """The tables ``hf-optim inspect`` prints."""
    optimizer = info.optimizer_class or "unknown class"
    if info.optimizer_name:
        optimizer += f" (registry name {info.optimizer_name!r})"
    summary = [
        ["Checkpoint", f"{info.directory}"],
        ["Format", f"version {info.format_version}, checkpoint id {info.checkpoint_id}"],
        ["Optimizer", optimizer],
        ["Parameters", f"{info.num_params} tensors, {info.numel:,} elements, state keyed by {info.keyed_by}"],
        ["State size", _size(info.state_bytes)],
        ["Files", ", ".join(os.path.basename(f) for f in info.files)],
        ["Step", _step(info.step)],
        ["Schedule", _schedule(info)],
    ]
    if info.accumulator_bytes is not None:
        summary.append(["Accumulator", _size(info.accumulator_bytes)])
    for key, value in (info.info or {}).items():
        summary.append([f"Converted: {key}", value])
    return "\n".join(_table(summary) + _groups(info.param_groups))


def format_sharded_info(info: ShardedStateInfo) -> str:
    """The tables ``hf-optim inspect`` prints for a sharded (FSDP2 or DeepSpeed ZeRO) checkpoint."""
    elements = sum(math.prod(shape) for entries in info.parameters.values() for shape in entries.values())
    summary = [
        ["Checkpoint", info.directory],
        ["Format", f"sharded, checkpoint id {info.checkpoint_id}"],
        ["Optimizer", info.optimizer_class or "unknown class"],
        ["Shards", f"{info.num_shards} file(s), saved by {info.world_size or '?'} process(es)"],
        ["Parameters", f"{len(info.parameters)} with state, {elements:,} state elements"],
        ["Step", _step(info.step)],
        ["Schedule", _schedule(info)],
        [
            "Accumulator",
            f"saved, {info.accumulator_gradients} gradient(s)"
            if info.accumulator_gradients is not None
            else "-",
        ],
    ]
    for key, value in (info.info or {}).items():
        summary.append([f"Converted: {key}", value])
    rows = [["parameter", "state", "global shape"]]
    for name, entries in info.parameters.items():
        for key, shape in entries.items():
            rows.append([name, key, "x".join(map(str, shape)) or "scalar"])
    return "\n".join([*_table(summary), *_groups(info.param_groups), "", *_table(rows)])


def run(args: argparse.Namespace) -> int:
    from hf_optim.hub import inspect_state
    from hf_optim.state import ShardedStateInfo

    info = inspect_state(
        args.path_or_repo_id,
        repo_type=args.repo_type,
        revision=args.revision,
        subfolder=args.subfolder,
        token=args.token,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        force_download=args.force_download,
    )
    if args.json:
        print(json.dumps(_jsonable(dataclasses.asdict(info)), indent=2, default=str))
    elif isinstance(info, ShardedStateInfo):
        print(format_sharded_info(info))
    else:
        print(format_info(info))
    return 0
