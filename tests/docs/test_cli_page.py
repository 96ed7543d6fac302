"""docs/cli.md is the ``--help`` of ``hf-optim`` and of each sub-command as the argparse parsers print it today."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "cli.md"


def _writer():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks() -> dict[str, str]:
    """The page's help texts by command (``hf-optim hub serve``)."""
    text = PAGE.read_text(encoding="utf-8")
    return dict(re.findall(r"^#+ `([^`]+)`\n\n```text\n(.*?)\n```$", text, flags=re.M | re.S))


def _printed_help(argv: list[str], monkeypatch) -> str:
    """What ``hf-optim ARGV --help`` prints, through the real entry point, 88 columns wide."""
    from hf_optim.cli.main import main

    monkeypatch.setenv("COLUMNS", "88")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue().rstrip()


def _commands() -> list[list[str]]:
    """Every command line of the parser tree (``[]``, ``["hub"]``, ``["hub", "serve"]``, ...)."""
    from hf_optim.cli.main import build_parser

    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, argv: list[str]) -> None:
        found.append(argv)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.prog.endswith(f" {name}"):  # aliases print the same parser
                        walk(sub, [*argv, name])

    walk(build_parser(), [])
    return found


def test_page_is_what_the_writer_produces():
    assert PAGE.read_text(encoding="utf-8") == _writer().render(), "run: python scripts/cli_reference.py"


def test_page_shows_the_help_of_every_command(monkeypatch):
    blocks = _blocks()
    commands = _commands()
    assert sorted(blocks) == sorted(" ".join(["hf-optim", *argv]) for argv in commands)
    for argv in commands:
        assert blocks[" ".join(["hf-optim", *argv])] == _printed_help(argv, monkeypatch), argv
