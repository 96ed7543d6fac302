"""Options of ``hf-optim hub serve``: sizes and where the token comes from (--token, --token-file, env)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hf_optim.hub_server.cli import TOKEN_ENV, add_serve_arguments, parse_size, resolve_token


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("512M", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("3KB", 3072),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5G", "1P", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["--root", "r", *argv])


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(parse()) is None
    monkeypatch.setenv(TOKEN_ENV, " from-env \n")
    assert resolve_token(parse()) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\nsecond line is ignored\n")
    assert resolve_token(parse("--token-file", str(token_file))) == "from-file"
    assert resolve_token(parse("--token", "from-flag")) == "from-flag"


def test_bad_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "   ")
    with pytest.raises(ValueError, match=TOKEN_ENV):
        resolve_token(parse())
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ValueError, match="--token-file"):
        resolve_token(parse("--token-file", str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        resolve_token(parse("--token-file", str(tmp_path / "empty")))
    with pytest.raises(SystemExit):
        parse("--token", "a", "--token-file", "b")
