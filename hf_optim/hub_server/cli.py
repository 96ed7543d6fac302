"""Command-line front of the local Hub, shared by ``hf-optim hub serve`` and ``python -m hf_optim.hub_server``."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from typing import Any

from hf_optim.hub_server.server import LocalHubServer
from hf_optim.hub_server.storage import DEFAULT_USER

logger = logging.getLogger("hf_optim.hub_server")


def _extensions(values: list[str]) -> list[str]:
    return [ext for value in values for ext in value.split(",") if ext.strip()]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``serve``: --root, --host, --port, --lfs-extensions, --user, --token, --verbose."""
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
    parser.add_argument(
        "--token", default=None, help="accept only this token (default: any token is accepted for writes)"
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
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(message)s")
    listen_socket = None
    if args.listen_fd is not None:  # a parent bound the socket already (see hf_optim.hub_server.testing)
        listen_socket = socket.socket(fileno=args.listen_fd)
    server = LocalHubServer(
        args.root,
        args.host,
        args.port,
        lfs_extensions=_extensions(args.lfs_extensions),
        user=args.user,
        token=args.token,
        fsync=args.fsync,
        listen_socket=listen_socket,
    )

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(server.url, flush=True)
    print(
        f"Local Hub serving {server.root}. Use it with: HF_ENDPOINT={server.url} HF_TOKEN=<any string>"
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
