"""``hf-optim consolidate``: turn a sharded (FSDP2) checkpoint into the ordinary single-process one.

Argument parsing and printing only; the work is :func:`hf_optim.state.consolidate_state`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "consolidate",
        help="write the single-process checkpoint of a sharded (FSDP2) one",
        description="Read a sharded optimizer checkpoint (optimizer.sharded.json and its per-process shards; a "
        "local directory, a Hub repo id or an hf:// URL) and write the ordinary single-process checkpoint "
        "(optimizer.safetensors, scheduler.json) to OUT_DIR. Runs in one process, without torch.distributed, "
        "one full tensor at a time (memory: about the largest tensor, not the whole state).",
    )
    parser.add_argument("sharded_dir", metavar="SHARDED_DIR", help="directory, repo id or hf:// URL")
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard the output above this size (default 5GB)"
    )
    parser.add_argument("--revision", help="Hub branch, tag or commit")
    parser.add_argument("--subfolder", help="folder inside the directory or repository")
    parser.add_argument("--token", help="Hub token (default: the stored one / HF_TOKEN)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hf_optim.hub import resolve_state_dir
    from hf_optim.state import consolidate_state

    directory = resolve_state_dir(
        args.sharded_dir, revision=args.revision, subfolder=args.subfolder, token=args.token
    )
    files = consolidate_state(directory, args.out_dir, max_shard_size=args.max_shard_size)
    print(
        f"wrote {len(files)} file(s) to {args.out_dir}: "
        + ", ".join(sorted(f.rsplit("/", 1)[-1] for f in files))
    )
    return 0
