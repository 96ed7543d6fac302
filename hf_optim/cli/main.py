"""Entry point of the ``hf-optim`` command: each sub-command lives in ``hf_optim/cli/<name>_cmd.py``.

A sub-command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (taking the
parsed ``argparse.Namespace`` and returning an exit code) with ``set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMANDS: tuple[str, ...] = ("list", "plot", "hub", "inspect", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-optim", description="hf_optim command line tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"hf_optim.cli.{name}_cmd").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"hf-optim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
