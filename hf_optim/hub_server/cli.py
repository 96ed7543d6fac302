"""Command-line front of the local Hub, shared by ``hf-optim hub serve`` and ``python -m hf_optim.hub_server``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from hf_optim.hub_server.server import DEFAULT_MAX_UPLOAD_SIZE, LocalHubServer
from hf_optim.hub_server.storage import DEFAULT_USER

logger = logging.getLogger("hf_optim.hub_server")

__all__ = ["TOKEN_ENV", "add_serve_arguments", "main", "parse_size", "resolve_token", "run_serve"]

TOKEN_ENV = "HF_OPTIM_HUB_TOKEN"
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)(i?B)?", re.IGNORECASE)


def _extensions(values: list[str]) -> list[str]:
    return [ext for value in values for ext in value.split(",") if ext.strip()]


def parse_size(text: str) -> int:
    """A byte count: ``1000``, ``512M``, ``2G``, ``1TiB`` (binary multiples)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 1000, 512M or 2G, got {text!r}")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def resolve_token(args: argparse.Namespace) -> str | None:
    """The server's token: --token, else the first line of --token-file, else $HF_OPTIM_HUB_TOKEN, else None."""
    if args.token is not None:
        token = args.token.strip()
        source = "--token"
    elif args.token_file is not None:
        try:
            lines = Path(args.token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--token-file {args.token_file}: cannot read it ({err})") from None
        token = lines[0].strip() if lines else ""
        source = f"--token-file {args.token_file}"
    elif os.environ.get(TOKEN_ENV) is not None:
        token = os.environ[TOKEN_ENV].strip()
        source = TOKEN_ENV
    else:
        return None
    if not token:
        raise ValueError(f"{source}: the token is empty")
    return token


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``serve``: --root, --host, --port, --lfs-extensions, --user, token options, --verbose."""
    parser.add_argument("--root", required=True, help="directory holding the repos (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--lfs-extensions",
        nargs="*",
        default=[],
        metavar="EXT",
        help="file suffixes uploaded through Git LFS, e.g. '.safetensors .bin' ('*': every file). Default: "
        "none, every file is a regular file (needed when clients keep xet enabled). LFS uploads need "
        "HF_HUB_DISABLE_XET=1 in the client.",
    )
    parser.add_argument(
        "--user", default=DEFAULT_USER, help=f"user name of every token (default: {DEFAULT_USER})"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        default=None,
        help=f"accept only this token for writes and private repos (default: ${TOKEN_ENV} if set, else any "
        "token is accepted). Visible to other local users in the process list: prefer --token-file.",
    )
    token.add_argument(
        "--token-file", default=None, metavar="PATH", help="read the token from the first line of this file"
    )
    parser.add_argument(
        "--max-upload-size",
        type=parse_size,
        default=DEFAULT_MAX_UPLOAD_SIZE,
        metavar="SIZE",
        help="largest commit body or LFS object accepted, e.g. 2G (default: 50G)",
    )
    parser.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="do not fsync written files (faster; writes stay atomic, but may be lost on power failure)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)


def run_serve(args: argparse.Namespace) -> int:
    """Start the server, print its URL as the first line of stdout, serve until SIGINT/SIGTERM."""
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not logger.hasHandlers():  # the process did not configure logging: print ours on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    token = resolve_token(args)
    listen_socket = None
    if args.listen_fd is not None:  # a parent bound the socket already (the test-suite's harness does)
        listen_socket = socket.socket(fileno=args.listen_fd)
    server = LocalHubServer(
        args.root,
        args.host,
        args.port,
        lfs_extensions=_extensions(args.lfs_extensions),
        user=args.user,
        token=token,
        fsync=args.fsync,
        max_upload_size=args.max_upload_size,
        listen_socket=listen_socket,
    )

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(server.url, flush=True)
    print(
        f"Local Hub serving {server.root}. Use it with: HF_ENDPOINT={server.url} "
        + ("HF_TOKEN=<the server's token>" if token is not None else "HF_TOKEN=<any string>")
        + ("" if not server.storage.lfs_extensions else " HF_HUB_DISABLE_XET=1"),
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_optim.hub_server", description="Serve a local Hugging Face Hub-compatible API."
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, OSError) as err:
        print(f"hf_optim.hub_server: error: {err}", file=sys.stderr)
        return 2
