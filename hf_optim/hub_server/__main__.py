"""``python -m hf_optim.hub_server --root DIR [--host H] [--port P]``: prints the URL, then serves."""

import sys

from hf_optim.hub_server.cli import main

if __name__ == "__main__":
    sys.exit(main())
