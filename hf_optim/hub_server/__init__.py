"""A local Hugging Face Hub-compatible server, so ``huggingface_hub`` works without huggingface.co.

Run ``hf-optim hub serve --root DIR`` (or ``python -m hf_optim.hub_server --root DIR``), then point clients at
it with ``HF_ENDPOINT=<printed URL>`` and any token (or the server's, if it was started with ``--token-file``,
``--token`` or ``HF_OPTIM_HUB_TOKEN``). From Python::

    from hf_optim.hub_server import serve

    server = serve("/tmp/hub", port=0)  # background thread; server.url, server.shutdown()

Standard library only: importing this package never imports huggingface_hub, torch or transformers.
"""

from hf_optim.hub_server.server import LocalHubServer, serve
from hf_optim.hub_server.storage import DEFAULT_USER, HubStorage

__all__ = ["DEFAULT_USER", "HubStorage", "LocalHubServer", "serve"]
