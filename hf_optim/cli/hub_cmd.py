"""``hf-optim hub serve``: run the local Hub-compatible server (see ``hf_optim.hub_server``)."""

from __future__ import annotations

import argparse

from hf_optim.hub_server.cli import add_serve_arguments, run_serve


def register(subparsers: argparse._SubParsersAction) -> None:
    hub = subparsers.add_parser("hub", help="local Hugging Face Hub-compatible server")
    hub_sub = hub.add_subparsers(dest="hub_command", required=True, metavar="SUBCOMMAND")
    serve = hub_sub.add_parser(
        "serve",
        help="serve repos from a directory over the Hub HTTP API",
        description="Serve a local Hugging Face Hub-compatible API. The first line printed on stdout is the "
        "URL to use as HF_ENDPOINT; any token is accepted for writes and private repos unless the server has "
        "one (--token-file, --token or $HF_OPTIM_HUB_TOKEN).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
