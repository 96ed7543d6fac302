"""Test-suite setup: an isolated Hugging Face environment and a session-wide local Hub over real HTTP.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` etc. once, when it is first imported. So, at import time of
this file (before pytest imports any test module) and with the standard library only, we bind a listening
socket on 127.0.0.1, point ``HF_ENDPOINT`` at it and set ``HF_HOME`` (temporary), ``HF_TOKEN``,
``HF_HUB_DISABLE_TELEMETRY=1`` and ``HF_HUB_DISABLE_XET=1``. The server itself,
``python -m hf_optim.hub_server`` serving ``.safetensors`` as LFS, is started in a subprocess on that socket
once collection shows a test needs it, and stopped at exit.

Tests that talk to the Hub must request the ``hub_server`` fixture (or ``hub_repo_id`` / ``hub_api``): it
waits until the server answers. ``spawn_hub_server`` starts a separate server subprocess (e.g. to stop it);
tests needing another client environment (xet on, offline) run the client with
``hf_optim.hub_server.testing.run_python`` and ``client_env``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
import uuid

if "huggingface_hub" in sys.modules:  # pragma: no cover - a plugin imported it before us
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT and HF_HOME; the test-suite "
        "would talk to the real Hub and the user's cache. Disable the plugin that imports it."
    )

TEST_TOKEN = "hf_local_test_token"
HUB_LFS_EXTENSIONS = (".safetensors",)

_BASE_DIR = tempfile.mkdtemp(prefix="hf-optim-tests-")
_HUB_ROOT = os.path.join(_BASE_DIR, "hub")
_LISTEN_SOCKET: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_LISTEN_SOCKET.bind(("127.0.0.1", 0))
_LISTEN_SOCKET.listen(64)
HUB_ENDPOINT = f"http://127.0.0.1:{_LISTEN_SOCKET.getsockname()[1]}"

for _name in (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
):
    os.environ.pop(_name, None)
os.environ.update(
    HF_ENDPOINT=HUB_ENDPOINT,
    HF_HOME=os.path.join(_BASE_DIR, "hf_home"),
    HF_TOKEN=TEST_TOKEN,
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)

# Only now may anything that imports huggingface_hub (hf_optim does) be imported.
import pytest  # noqa: E402

from hf_optim.hub_server.testing import HubProcess, spawn_hub_server, start_hub_process  # noqa: E402

_SESSION_HUB: HubProcess | None = None


def _start_session_hub() -> HubProcess:
    global _LISTEN_SOCKET, _SESSION_HUB
    if _SESSION_HUB is None:
        assert _LISTEN_SOCKET is not None
        _SESSION_HUB = start_hub_process(
            _HUB_ROOT, lfs_extensions=HUB_LFS_EXTENSIONS, token=TEST_TOKEN, listen_socket=_LISTEN_SOCKET
        )
        _LISTEN_SOCKET = None  # handed over to the subprocess
    return _SESSION_HUB


def _cleanup() -> None:
    if _SESSION_HUB is not None:
        _SESSION_HUB.stop()
    if _LISTEN_SOCKET is not None:
        _LISTEN_SOCKET.close()
    shutil.rmtree(_BASE_DIR, ignore_errors=True)


atexit.register(_cleanup)

_HUB_FIXTURES = {"hub_server", "hub_repo_id", "hub_api"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the server early (it needs a few seconds to import) if any collected test will use it."""
    if any(_HUB_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        _start_session_hub()


@pytest.fixture(scope="session")
def hub_server() -> HubProcess:
    """The session's local Hub: ``.endpoint`` (== HF_ENDPOINT), ``.token`` (== HF_TOKEN), ``.root``."""
    return _start_session_hub().wait_ready()


@pytest.fixture
def hub_repo_id(hub_server: HubProcess) -> str:
    """A repo id nobody used yet on the session Hub (the repo is not created)."""
    return f"local-user/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def hub_api(hub_server: HubProcess):
    """``huggingface_hub.HfApi`` bound to the session Hub and its token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)


@pytest.fixture
def spawn_hub_server_factory(tmp_path):
    """``spawn_hub_server_factory(**kwargs)``: context manager running a separate local Hub subprocess.

    Its root defaults to ``tmp_path / "hub-N"``; keyword arguments go to
    ``hf_optim.hub_server.testing.start_hub_process`` (``lfs_extensions``, ``cli``, ...).
    """
    counter = iter(range(1_000_000))

    def factory(root=None, **kwargs):
        return spawn_hub_server(root if root is not None else tmp_path / f"hub-{next(counter)}", **kwargs)

    return factory


@pytest.fixture(autouse=True)
def _restore_registry():
    """Entries a test registers (unique names, overwrites) are gone after it, so every test sees the builtins.

    Listeners and providers are left alone (the transformers integration adds its own the first time
    transformers is imported, whichever test that happens in).
    """
    from hf_optim import registry

    with registry.snapshot():
        yield
