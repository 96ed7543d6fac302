"""Write docs/cli.md, the command line reference, from the argparse parsers of ``hf-optim`` and its sub-commands.

    python scripts/cli_reference.py          # rewrite docs/cli.md
    python scripts/cli_reference.py --check  # exit 1 if docs/cli.md differs from what the parsers print

The page is committed so that it reads on GitHub too; tests/docs/test_cli_page.py and the docs build
(docs/hooks.py) fail when it is stale. The help text is rendered 88 columns wide (the width of a code block), with
the Python the CI runs (argparse's layout changes between Python versions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = "88"
HEADER = """# Command line reference

`hf-optim` (also `python -m hf_optim.cli`) groups the tools below. This page is the `--help` of each command, written
from the argument parsers themselves (`hf_optim.cli.main.build_parser()`) by `python scripts/cli_reference.py`; a
test fails when it differs from them.
"""


def _sections(parser: argparse.ArgumentParser, depth: int) -> list[str]:
    parts = [f"{'#' * depth} `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                parts += _sections(sub, min(depth + 1, 4))
    return parts


def render() -> str:
    """The page's text: the help of ``hf-optim`` and of every sub-command, depth first."""
    from hf_optim.cli.main import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = (
        WIDTH  # argparse reads the width when a formatter is made: the same text everywhere
    )
    try:
        body = "\n".join(_sections(build_parser(), 2))
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return f"{HEADER}\n{body}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write (or --check) docs/cli.md from the hf-optim parsers.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale, write nothing")
    options = parser.parse_args()
    text = render()
    if options.check:
        stale = PAGE.read_text(encoding="utf-8") != text
        print(f"{PAGE} is {'stale: run python scripts/cli_reference.py' if stale else 'current'}")
        sys.exit(1 if stale else 0)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
