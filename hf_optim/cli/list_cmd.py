"""``hf-optim list``: the optimizers and learning-rate schedules by name, with their source and descriptions.

Optimizers come from hf_optim's registry (source ``hf_optim``) and, when transformers is installed, from
transformers' own ``optim`` names (source ``transformers``), which ``hf_optim.create_optimizer`` builds too.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "list",
        help="list registered optimizers and schedules",
        description="List the registered optimizers and learning-rate schedules (names accept wildcards).",
    )
    parser.add_argument(
        "pattern", nargs="*", help="only names matching these shell-style wildcards, e.g. 'cosine*'"
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--optimizers", action="store_true", help="list optimizers only")
    kind.add_argument("--schedulers", action="store_true", help="list schedules only")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show arguments, defaults and renames"
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="SOURCE",
        help="only optimizers from this source (hf_optim, transformers); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _arguments(factory: Any) -> list[str]:
    """``name`` or ``name=default`` for each keyword argument after the first (params / optimizer)."""
    try:
        params = list(inspect.signature(factory).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    out = []
    for p in params:
        if p.name == "last_epoch" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        out.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return out


def _entries(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from hf_optim import registry

    pattern = args.pattern or None
    result: dict[str, list[dict[str, Any]]] = {}
    if not args.schedulers:
        result["optimizers"] = []
        for name in registry.list_optimizers(pattern, source=args.source):
            info = registry.get_optimizer_info(name)
            result["optimizers"].append(
                {
                    "name": name,
                    "source": info.source,
                    "description": info.description,
                    "arguments": _arguments(info.factory),
                    "defaults": {k: repr(v) for k, v in info.defaults.items()},
                    "arg_names": {
                        k: list(v) if isinstance(v, tuple) else v for k, v in info.arg_names.items()
                    },
                }
            )
    if not args.optimizers:
        result["schedulers"] = []
        for name in registry.list_schedulers(pattern):
            scheduler_info = registry.get_scheduler_info(name)
            result["schedulers"].append(
                {
                    "name": name,
                    "description": scheduler_info.description,
                    "arguments": _arguments(scheduler_info.factory),
                }
            )
    return result


def run(args: argparse.Namespace) -> int:
    entries = _entries(args)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    titles = {"optimizers": "Optimizers", "schedulers": "Schedules"}
    width = max((len(e["name"]) for group in entries.values() for e in group), default=0) + 2
    blocks = []
    for kind, group in entries.items():
        lines = [f"{titles[kind]} ({len(group)}):"]
        if not group:
            lines.append("  (none match)")
        for e in group:
            source = f"[{e['source']}] " if "source" in e else ""
            lines.append(f"  {e['name']:<{width}}{source}{e['description']}".rstrip())
            if args.verbose:
                pad = " " * (width + 2)
                lines.append(f"{pad}arguments: {', '.join(e['arguments']) or '-'}")
                if e.get("defaults"):
                    lines.append(f"{pad}defaults: {', '.join(f'{k}={v}' for k, v in e['defaults'].items())}")
                if e.get("arg_names"):
                    renames = ", ".join(
                        f"{k} -> {'/'.join(v) if isinstance(v, list) else v}"
                        for k, v in e["arg_names"].items()
                    )
                    lines.append(f"{pad}renames: {renames}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0
