"""The ``hf-optim`` console script's entry point, installed outside the package as ``_hf_optim_console.py``.

It answers ``hf-optim --version`` from the installed package's metadata, importing nothing of ``hf_optim``, and
hands every other command line to :func:`hf_optim.cli.main.main`. The build (``hatch_build.py``) copies it next
to the package.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        from importlib.metadata import version

        print(f"hf-optim {version('hf_optim')}")
        return 0
    from hf_optim.cli.main import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
