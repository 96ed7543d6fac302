"""Helpers for test-suites that talk to the local Hub over real HTTP.

``start_hub_process`` runs ``python -m hf_optim.hub_server`` (or ``hf-optim hub serve``) in a subprocess. The
listening socket is bound here, in the parent, and handed to the child (POSIX ``pass_fds``): the endpoint is
known at once (set ``HF_ENDPOINT`` before importing huggingface_hub) and requests made before the child is
up wait in the socket backlog instead of failing. ``run_python`` runs client code in a fresh interpreter
with its own environment (huggingface_hub reads its settings once, at import).

Standard library only, like the rest of ``hf_optim.hub_server``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TEST_TOKEN = "hf_local_test_token"
_HF_ENV_TO_CLEAR = (
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
)


def bind_listen_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a free port of ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


def endpoint_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
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
) -> HubProcess:
    """Start a local Hub subprocess serving ``root``; returns at once (``wait_ready()`` blocks until it serves).

    ``listen_socket``: serve on this bound socket (it is handed over to the child and closed here); by default
    a free port of ``host`` is bound. ``cli=True`` runs ``python -m hf_optim.cli.main hub serve`` instead of
    ``python -m hf_optim.hub_server``. ``token`` is only recorded: the server accepts any token. Files are not
    fsync'd unless ``fsync=True`` (test data is throw-away; writes stay atomic).
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
    env = {k: v for k, v in os.environ.items() if k not in _HF_ENV_TO_CLEAR and k != "HF_TOKEN"}
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
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"client subprocess failed ({result.returncode}):\n--- stdout\n{result.stdout}\n--- stderr\n"
            f"{result.stderr[-6000:]}"
        )
    return result.stdout
