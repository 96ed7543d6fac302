"""Entry point of the ``hf-optim`` command: each sub-command lives in ``hf_optim/cli/<name>_cmd.py``.

A sub-command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (taking the
parsed ``argparse.Namespace`` and returning an exit code) with ``set_defaults``. Sub-command modules import torch
and the rest of the library in the functions that run a command, so that parsing and ``--help`` start at once.

Logging: only hf_optim's own logger is configured (INFO, unless ``HF_OPTIM_VERBOSITY`` says otherwise), never the
root logger, so other libraries (huggingface_hub's HTTP client, ...) stay quiet. Output cut short by a closed pipe
(``hf-optim list | head``) ends quietly, as Python's documentation recommends for ``SIGPIPE``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from hf_optim import __version__
from hf_optim import logging as hf_logging
from hf_optim.cli import printable

_COMMANDS: tuple[str, ...] = ("list", "plot", "hub", "inspect", "convert", "consolidate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-optim", description="hf_optim command line tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"hf_optim.cli.{name}_cmd").register(sub)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away: point stdout at devnull so that the interpreter's final flush does not
    fail again, and exit with 1 (what Python itself does on ``EPIPE``)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = hf_logging.get_logger().level
    if not os.environ.get(hf_logging.ENV_VERBOSITY):
        hf_logging.set_verbosity_info()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here at the latest
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (TypeError, ValueError, FileNotFoundError, OSError) as err:
        print(printable(f"hf-optim {args.command}: error: {err}"), file=sys.stderr)
        return 2
    finally:
        hf_logging.get_logger().setLevel(previous)


if __name__ == "__main__":
    sys.exit(main())
