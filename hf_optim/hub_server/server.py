"""HTTP front of the local Hub: the subset of the Hugging Face Hub API that ``huggingface_hub`` 2.x uses.

Standard library only (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive). Endpoints:

- download: ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` (``X-Repo-Commit``, ``ETag``; LFS files add
  ``X-Linked-Etag``/``X-Linked-Size``; ``Range: bytes=`` requests get 206/416);
- repo info / listing: ``GET /api/{type}s/{repo}[/revision/{rev}]``, ``/tree/{rev}[/{path}]`` (paginated with a
  ``Link`` header), ``POST /paths-info/{rev}``, ``GET /refs``, ``GET /commits/{rev}``, ``GET /api/{type}s``;
- upload: ``POST /api/repos/create`` (409 if it exists), ``DELETE /api/repos/delete``, ``POST /api/repos/move``,
  ``POST /preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` to the returned href,
  ``POST /commit/{rev}`` (NDJSON ``header``/``file``/``lfsFile``/``deletedFile``/``deletedFolder``,
  ``?create_pr=1``, ``parentCommit``), ``POST|DELETE /branch/{name}``, ``POST /tag/{rev}``, ``DELETE /tag/{tag}``,
  ``POST /discussions`` and ``GET /discussions/{num}`` (pull requests), ``PUT /settings``;
- ``GET /api/whoami-v2`` (any token) and ``POST /api/validate-yaml`` (accepts everything).

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``,
which is how the client picks its exception classes; a malformed request gets a 4xx with a short message, never
internals. Writes and private repos need a bearer token (any string, or exactly ``token`` if the server was
started with one). LFS transfers go to signed, short-lived hrefs (``hf_optim.hub_server.signing``) and reach an
object only through a repo whose commits hold it. Bodies are limited while they are read
(``hf_optim.hub_server.body``). Xet is not implemented: the xet token endpoints answer 501.

Modules: ``routes`` (the URL tables), ``handler`` (HTTP plumbing, auth, replies), ``api_repos`` / ``api_files``
(the endpoints by API area), ``storage`` / ``blobs`` / ``records`` / ``tree`` (persistence); this module holds the
server object.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from hf_optim.hub_server.api_files import FileApi
from hf_optim.hub_server.api_repos import RepoApi
from hf_optim.hub_server.handler import DEFAULT_MAX_UPLOAD_SIZE
from hf_optim.hub_server.records import DEFAULT_USER
from hf_optim.hub_server.signing import UrlSigner
from hf_optim.hub_server.storage import HubStorage

logger = logging.getLogger("hf_optim.hub_server")

__all__ = ["DEFAULT_MAX_UPLOAD_SIZE", "Handler", "HubHTTPServer", "LocalHubServer", "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(RepoApi, FileApi):
    """The request handler: every API area's endpoints, reached through :mod:`~hf_optim.hub_server.routes`."""


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    hub: LocalHubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("local Hub: connection error from %s", client_address, exc_info=True)


class HubHTTPServer6(HubHTTPServer):
    address_family = socket.AF_INET6


class LocalHubServer:
    """A local Hub-compatible HTTP server persisting repos under ``root``.

    ``port=0`` picks a free port (see ``url``). ``lfs_extensions``: suffixes uploaded through LFS
    (default none: every file is regular, so clients with xet enabled work). ``token``: if given, the only
    token accepted for writes and private repos (otherwise any bearer token is; listening beyond this
    machine without one logs a warning). ``max_upload_size``: largest commit body or LFS object, in bytes.
    ``listen_socket``: an already bound and listening socket to serve on (host and port are then ignored).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lfs_extensions: tuple[str, ...] | list[str] = (),
        user: str = DEFAULT_USER,
        token: str | None = None,
        fsync: bool = True,
        max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
        listen_socket: socket.socket | None = None,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {port}")
        if token is not None and (not token.strip() or token != token.strip()):
            raise ValueError("--token: expected a non-empty token without surrounding whitespace")
        if max_upload_size < 1:
            raise ValueError(f"--max-upload-size must be positive, got {max_upload_size}")
        self.storage = HubStorage(root, lfs_extensions=lfs_extensions, user=user, fsync=fsync)
        self.token = token
        self.max_upload_size = int(max_upload_size)
        self.signer = UrlSigner()
        server_cls = HubHTTPServer6 if ":" in host else HubHTTPServer
        if listen_socket is not None:
            server_cls = HubHTTPServer6 if listen_socket.family == socket.AF_INET6 else HubHTTPServer
            self._httpd = server_cls(listen_socket.getsockname()[:2], Handler, bind_and_activate=False)
            self._httpd.socket.close()
            self._httpd.socket = listen_socket
            self._httpd.server_address = listen_socket.getsockname()[:2]
        else:
            self._httpd = server_cls((host, int(port)), Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None
        self._closed = False
        if token is None and not is_loopback(self.host):
            logger.warning(
                "the local Hub listens on %s without a token: anyone who can reach it can create, change and "
                "delete repos and read private ones. Pass --token, --token-file or set HF_OPTIM_HUB_TOKEN.",
                self.host,
            )
        pruned = self.storage.prune_uploads()
        if pruned:
            logger.debug("removed %d stale uncommitted LFS uploads", pruned)

    @property
    def root(self) -> str:
        return str(self.storage.root)

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:8765``."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``shutdown()`` (from another thread) or KeyboardInterrupt."""
        logger.info("local Hub serving %s at %s", self.root, self.url)
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> LocalHubServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("the local Hub server is already running")
        self._thread = threading.Thread(target=self.serve_forever, name="hf-optim-local-hub", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def __enter__(self) -> LocalHubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"LocalHubServer(url={self.url!r}, root={self.root!r})"


def serve(
    root: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    lfs_extensions: tuple[str, ...] | list[str] = (),
    user: str = DEFAULT_USER,
    token: str | None = None,
    fsync: bool = True,
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE,
) -> LocalHubServer:
    """Start a local Hub in a background thread and return it (``.url``, ``.shutdown()``)."""
    return LocalHubServer(
        root,
        host,
        port,
        lfs_extensions=lfs_extensions,
        user=user,
        token=token,
        fsync=fsync,
        max_upload_size=max_upload_size,
    ).start()
