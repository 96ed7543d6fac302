"""Pytest plugin: the test-suite's local Hub over real HTTP, and helpers for client subprocesses.

Registered from tests/conftest.py, which first calls ``isolate_hf_environment()``: huggingface_hub reads
``HF_ENDPOINT``, ``HF_HOME`` etc. once, when it is first imported, so they must be set before any test module
(or hf_optim, which imports huggingface_hub) is imported. That call binds a listening socket on 127.0.0.1,
points ``HF_ENDPOINT`` at it and sets ``HF_HOME`` (temporary), ``HF_TOKEN``, ``HF_HUB_DISABLE_TELEMETRY=1`` and
``HF_HUB_DISABLE_XET=1``. The server itself, ``python -m hf_optim.hub_server`` serving ``.safetensors`` as LFS,
is started in a subprocess on that socket once collection shows a test needs it, and stopped at exit.

The listening socket is bound here, in the parent, and handed to the child (POSIX ``pass_fds``): the endpoint
is known at once and requests made before the child is up wait in the socket backlog instead of failing.

Fixtures: ``hub_server`` (waits until the server answers), ``hub_repo_id``, ``hub_api`` and
``spawn_hub_server_factory`` (a separate server subprocess, e.g. to stop it or give it options). Tests needing
another client environment (xet on, offline) run the client with ``run_python(code, client_env(...))``.

Standard library only at import (huggingface_hub is imported lazily, inside fixtures).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TEST_TOKEN = "hf_local_test_token"
HUB_LFS_EXTENSIONS = (".safetensors",)
# Settings of the user's environment that would point clients at another cache, token or mode.
HF_ENV_TO_CLEAR = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_XET",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
    "HF_OPTIM_HUB_TOKEN",
)


def bind_listen_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a free port of ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


def endpoint_of(sock: socket.socket) -> str:
    """The URL to reach a listening socket (a wildcard address is reached on the loopback interface)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class HubProcess:
    """A local Hub running in a subprocess: ``endpoint``, ``token``, ``root``; ``stop()`` ends it."""

    endpoint: str
    root: str
    token: str
    process: subprocess.Popen[str]
    log_path: str
    _ready: bool = field(default=False, repr=False)

    def wait_ready(self, timeout: float = 180.0) -> HubProcess:
        """Block until the server printed its URL (it then accepts requests); raise with its log otherwise."""
        if self._ready:
            return self
        stdout = self.process.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = lines[0].strip() if lines else ""
        if line != self.endpoint:
            self.stop()
            raise RuntimeError(
                f"local Hub subprocess did not start (printed {line!r}, expected {self.endpoint!r}); "
                f"log {self.log_path}:\n{self.log()}"
            )
        self._ready = True
        return self

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait for it; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> HubProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_hub_process(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    lfs_extensions: tuple[str, ...] | list[str] = (),
    token: str = TEST_TOKEN,
    listen_socket: socket.socket | None = None,
    cli: bool = False,
    log_path: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    fsync: bool = False,
    require_token: bool = False,
    extra_args: tuple[str, ...] | list[str] = (),
    env: Mapping[str, str] | None = None,
) -> HubProcess:
    """Start a local Hub subprocess serving ``root``; returns at once (``wait_ready()`` blocks until it serves).

    ``listen_socket``: serve on this bound socket (it is handed over to the child and closed here); by default
    a free port of ``host`` is bound. ``cli=True`` runs ``python -m hf_optim.cli.main hub serve`` instead of
    ``python -m hf_optim.hub_server``. ``token`` is what clients should send; the server accepts any token
    unless ``require_token`` (then it gets ``--token``). ``extra_args`` go to the command line, ``env``
    replaces the server's environment. Files are not fsync'd unless ``fsync=True`` (test data is throw-away;
    writes stay atomic).
    """
    root = str(Path(root).resolve())
    Path(root).mkdir(parents=True, exist_ok=True)
    if log_path is None:
        log_path = str(Path(root).parent / f"{Path(root).name}-server.log")
    command = (
        [sys.executable, "-m", "hf_optim.cli.main", "hub", "serve"]
        if cli
        else [
            sys.executable,
            "-m",
            "hf_optim.hub_server",
        ]
    )
    command += ["--root", root]
    if lfs_extensions:
        command += ["--lfs-extensions", *lfs_extensions]
    if verbose:
        command.append("--verbose")
    if not fsync:
        command.append("--no-fsync")
    if require_token:
        command += ["--token", token]
    command += list(extra_args)
    sock = listen_socket
    pass_fds: tuple[int, ...] = ()
    if os.name == "posix":
        if sock is None:
            sock = bind_listen_socket(host)
        command += ["--listen-fd", str(sock.fileno())]
        pass_fds = (sock.fileno(),)
        endpoint = endpoint_of(sock)
    else:  # pragma: no cover - no fd passing: let the child pick a port and read it from its first line
        command += ["--host", host, "--port", "0"]
        endpoint = ""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            pass_fds=pass_fds,
            env=None if env is None else dict(env),
        )
    if sock is not None:
        sock.close()  # the child owns it now: once the child exits, connections are refused
    hub = HubProcess(endpoint=endpoint, root=root, token=token, process=process, log_path=str(log_path))
    if not endpoint:  # pragma: no cover - Windows
        assert process.stdout is not None
        hub.endpoint = process.stdout.readline().strip()
        hub._ready = bool(hub.endpoint)
    return hub


@contextlib.contextmanager
def spawn_hub_server(root: str | os.PathLike[str] | None = None, **kwargs: object) -> Iterator[HubProcess]:
    """Context manager: a separate local Hub subprocess (temporary root by default), stopped on exit."""
    tmp = None
    if root is None:
        tmp = tempfile.mkdtemp(prefix="hf-optim-hub-")
        root = os.path.join(tmp, "hub")
    hub = start_hub_process(root, **kwargs)  # type: ignore[arg-type]
    try:
        yield hub.wait_ready()
    finally:
        hub.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def client_env(
    endpoint: str,
    hf_home: str | os.PathLike[str],
    *,
    token: str | None = TEST_TOKEN,
    xet: bool = False,
    offline: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a huggingface_hub client subprocess: endpoint, cache, token, xet and offline switches."""
    env = {k: v for k, v in os.environ.items() if k not in HF_ENV_TO_CLEAR and k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    if token is not None:
        env["HF_TOKEN"] = token
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def run_python(code: str, env: Mapping[str, str], *args: str, timeout: float = 300.0) -> str:
    """Run ``python -c code *args`` with exactly ``env``; return its stdout, raise AssertionError on failure."""
    return start_python(code, env, *args, timeout=timeout)()


def start_python(code: str, env: Mapping[str, str], *args: str, timeout: float = 300.0) -> Callable[[], str]:
    """Start ``python -c code *args`` with exactly ``env`` and return a function that waits for it and returns
    as :func:`run_python` does: for clients that mostly wait (huggingface_hub's retries against an unreachable
    Hub), run beside the rest of a test."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout

    def result() -> str:
        try:
            stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        if process.returncode != 0:
            raise AssertionError(
                f"client subprocess failed ({process.returncode}):\n--- stdout\n{stdout}\n--- stderr\n"
                f"{stderr[-6000:]}"
            )
        return stdout

    return result


# ---------------------------------------------------------------------- the session's Hub
class _Session:
    """State of the session Hub: temporary folders, the socket bound early, the server once started."""

    base_dir: str | None = None
    listen_socket: socket.socket | None = None
    hub: HubProcess | None = None


def isolate_hf_environment() -> str:
    """Bind the session Hub's socket and set the HF_* variables; returns the endpoint. Idempotent.

    Must run before huggingface_hub is imported (tests/conftest.py calls it first thing).
    """
    if _Session.base_dir is not None:
        return os.environ["HF_ENDPOINT"]
    if "huggingface_hub" in sys.modules:  # pragma: no cover - a plugin imported it before us
        raise RuntimeError(
            "huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT and HF_HOME; the "
            "test-suite would talk to the real Hub and the user's cache. Disable the plugin that imports it."
        )
    _Session.base_dir = tempfile.mkdtemp(prefix="hf-optim-tests-")
    _Session.listen_socket = bind_listen_socket()
    for name in HF_ENV_TO_CLEAR:
        os.environ.pop(name, None)
    os.environ.update(
        HF_ENDPOINT=endpoint_of(_Session.listen_socket),
        HF_HOME=os.path.join(_Session.base_dir, "hf_home"),
        HF_TOKEN=TEST_TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    atexit.register(_cleanup)
    return os.environ["HF_ENDPOINT"]


def _start_session_hub() -> HubProcess:
    if _Session.hub is None:
        if _Session.listen_socket is None or _Session.base_dir is None:
            raise RuntimeError("tests/conftest.py must call isolate_hf_environment() before the Hub starts")
        _Session.hub = start_hub_process(
            os.path.join(_Session.base_dir, "hub"),
            lfs_extensions=HUB_LFS_EXTENSIONS,
            token=TEST_TOKEN,
            listen_socket=_Session.listen_socket,
        )
        _Session.listen_socket = None  # handed over to the subprocess
    return _Session.hub


def _cleanup() -> None:
    if _Session.hub is not None:
        _Session.hub.stop()
    if _Session.listen_socket is not None:
        _Session.listen_socket.close()
    if _Session.base_dir is not None:
        shutil.rmtree(_Session.base_dir, ignore_errors=True)


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

    Its root defaults to ``tmp_path / "hub-N"``; keyword arguments go to ``start_hub_process``
    (``lfs_extensions``, ``cli``, ``require_token``, ``extra_args``, ``env``, ...).
    """
    counter = iter(range(1_000_000))

    def factory(root=None, **kwargs):
        return spawn_hub_server(root if root is not None else tmp_path / f"hub-{next(counter)}", **kwargs)

    return factory
