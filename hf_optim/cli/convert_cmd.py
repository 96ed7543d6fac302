"""``hf-optim convert``: turn a Trainer / Accelerate checkpoint's pickled optimizer state into safetensors.

Argument parsing and printing only; the conversion is :func:`hf_optim.state.convert.convert_checkpoint`.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Trainer / Accelerate optimizer.pt / .bin, or a DeepSpeed checkpoint, to safetensors",
        description="Convert optimizer.pt / optimizer.bin and scheduler.pt / scheduler.bin of a transformers "
        "Trainer or Accelerate checkpoint (read with torch.load(weights_only=True)) into optimizer.safetensors "
        "and scheduler.json beside them. What could be inferred (optimizer class, Trainer step) and what could "
        "not is recorded in the checkpoint and shown by `hf-optim inspect`. A folder holding a stock DeepSpeed "
        "ZeRO 1/2/3 checkpoint (a 'latest' file and global_stepN/, or global_stepN/ itself) becomes "
        "optimizer.sharded.json with one partition file per DeepSpeed process, and model.safetensors (fp32): "
        "it then resumes on any number of processes, any ZeRO stage, FSDP2 or one process.",
    )
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR")
    parser.add_argument(
        "--tag",
        help="DeepSpeed checkpoints: the global_stepN folder to convert (default: the one 'latest' names)",
    )
    parser.add_argument(
        "--names-from",
        metavar="MODEL_DIR_OR_FILE",
        help="parameter names: a file with one name per line (optimizer order), or a model directory with "
        "config.json whose parameters are grouped as transformers' Trainer does (not needed for DeepSpeed "
        "checkpoints, which name their parameters)",
    )
    parser.add_argument("--output", metavar="DIR", help="write here instead of CHECKPOINT_DIR")
    parser.add_argument(
        "--optimizer-class",
        help="record this optimizer class, e.g. torch.optim.adamw.AdamW (default: inferred from the state keys)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard the state above this size (default 5GB)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_optim.state.convert import convert_checkpoint

    written = convert_checkpoint(
        args.checkpoint_dir,
        names_from=args.names_from,
        output=args.output,
        optimizer_class=args.optimizer_class,
        max_shard_size=args.max_shard_size,
        tag=args.tag,
    )
    for path in written:
        print(path)
    return 0
