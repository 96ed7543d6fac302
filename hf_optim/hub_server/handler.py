"""The local Hub's HTTP plumbing: request dispatch, error replies, authentication, request bodies and replies,
shared by the handlers of every API area (:mod:`~hf_optim.hub_server.api_repos`,
:mod:`~hf_optim.hub_server.api_files`); requests reach them through the route table
(:mod:`~hf_optim.hub_server.routes`)."""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from hf_optim.hub_server.body import RequestBody
from hf_optim.hub_server.records import URL_PREFIXES, BadRequest, HubError, RepoNotFound, Unauthorized
from hf_optim.hub_server.routes import route
from hf_optim.hub_server.storage import HubStorage

if TYPE_CHECKING:
    from hf_optim.hub_server.server import HubHTTPServer

logger = logging.getLogger("hf_optim.hub_server")

__all__ = [
    "DEFAULT_MAX_UPLOAD_SIZE",
    "DIGITS_RE",
    "EXPAND_PAGE_SIZE",
    "JSON_BODY_LIMIT",
    "OID_RE",
    "PAGE_SIZE",
    "RANGE_RE",
    "BaseHandler",
    "InternalError",
    "header_safe",
    "int_field",
    "str_field",
    "truthy",
]

PAGE_SIZE = 1000  # entries per page of tree / commits listings, as on the Hub
EXPAND_PAGE_SIZE = 50
JSON_BODY_LIMIT = 16 << 20  # bodies of JSON endpoints (every endpoint but commits and LFS uploads)
DEFAULT_MAX_UPLOAD_SIZE = 50 << 30  # commit bodies and LFS objects (the Hub's per-file limit)
_DRAIN_LIMIT = 1 << 20  # unread body bytes read and dropped to keep a connection alive
_LINGER_LIMIT = 4 << 20  # bytes read and dropped after an error reply, so that the client sees the reply
_LINGER_SECONDS = 2.0
OID_RE = re.compile(r"[0-9a-f]{64}")
DIGITS_RE = re.compile(r"[0-9]{1,19}")
RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class InternalError(HubError):
    status = 500


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def header_safe(text: str) -> str:
    """One line of latin-1 without control characters, as an HTTP header value must be."""
    text = _CONTROL_RE.sub(" ", " ".join(text.split()))
    return text.encode("latin-1", "replace").decode("latin-1")[:2000]


def int_field(value: Any, name: str) -> int:
    """A non-negative integer from a JSON body (BadRequest otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name!r} must be a non-negative integer.")
    return value


def str_field(value: Any, name: str) -> str | None:
    """An optional string from a JSON body (BadRequest for another type)."""
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name!r} must be a string.")
    return value


class BaseHandler(BaseHTTPRequestHandler):
    """HTTP plumbing shared by the API areas: dispatch, errors, authentication, bodies and replies."""

    protocol_version = "HTTP/1.1"
    server_version = "hf-optim-local-hub"
    timeout = 300  # idle keep-alive connections are closed after this many seconds
    # Errors found by http.server itself (request line, headers): a short plain message.
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    default_request_version = "HTTP/1.0"  # replies to unparsable request lines get a status line too
    server: HubHTTPServer
    _method: str
    _query: dict[str, str]

    # ------------------------------------------------------------------ plumbing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors; an unknown method is the client's error (405), not 501."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed"
        super().send_error(code, message, None)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    @property
    def storage(self) -> HubStorage:
        return self.server.hub.storage

    @property
    def body(self) -> RequestBody:
        """The current request's body (set by ``_dispatch``)."""
        assert self._body is not None
        return self._body

    def _dispatch(self, method: str) -> None:
        self._method = method
        self._started = False
        self._body: RequestBody | None = None  # the handler is reused for every request of a connection
        try:
            self._body = RequestBody(self.rfile, self.headers, method, JSON_BODY_LIMIT)
            split = urlsplit(self.path)
            self._query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            self._route(method, split.path)
        except HubError as err:
            self._fail(err)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception:  # a bug: log it here, answer a 500 without internals and keep serving
            logger.exception("local Hub: error while handling %s %s", method, self.path)
            self._fail(InternalError("Internal error of the local Hub (details are in the server log)."))
        try:
            if self._body is None or not self._body.drain(_DRAIN_LIMIT):
                self.close_connection = True
        except (HubError, OSError):
            self.close_connection = True

    def _fail(self, err: HubError) -> None:
        """Answer ``err``; if the request body cannot be drained, close the connection after a lingering read."""
        if self._started:
            self.close_connection = True
            return
        unread = None if self._body is None else self._body.unread
        closing = self._body is None or unread is None or unread > _DRAIN_LIMIT
        try:
            self._send_error(err, close=closing)
            if closing:
                self._linger()
        except OSError:
            self.close_connection = True

    def _linger(self) -> None:
        """Half-close and read a little of what the client still sends, so that its reading the error reply
        is not cut by a reset; then the connection closes."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_SECONDS
        received = 0
        while received < _LINGER_LIMIT and (left := deadline - time.monotonic()) > 0:
            self.connection.settimeout(left)
            data = self.connection.recv(1 << 16)
            if not data:
                break
            received += len(data)

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        if not host:
            addr, port = self.server.server_address[:2]
            addr = addr.decode() if isinstance(addr, bytes) else addr
            host = f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"
        return f"http://{host}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return auth[7:].strip()
        return None

    def _token_ok(self) -> bool:
        """Whether the request carries a token that may read private repos and write."""
        token = self._token()
        expected = self.server.hub.token
        if token is None or expected is None:
            return token is not None
        return hmac.compare_digest(token.encode("utf-8", "replace"), expected.encode("utf-8"))

    def _require_write(self) -> None:
        if self._token() is None:
            raise Unauthorized(
                "This action needs an access token: pass token=... or set HF_TOKEN (any string works with the "
                "local Hub unless it was started with a token)."
            )
        if not self._token_ok():
            raise Unauthorized("Invalid credentials in Authorization header")

    def _read_repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        meta = self.storage.get_repo(repo_type, repo_id)
        if meta["private"] and not self._token_ok():
            raise RepoNotFound(f"Repository {repo_id!r} ({repo_type}) not found.")
        return meta

    def _json_body(self) -> dict[str, Any]:
        raw = self.body.read()
        if not raw.strip():
            return {}
        ctype = self.headers.get("Content-Type", "")
        if "application/x-www-form-urlencoded" in ctype:
            try:
                parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                raise BadRequest("Form body is not valid UTF-8.") from None
            return {k: (v if len(v) > 1 or k == "paths" else v[0]) for k, v in parsed.items()}
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRequest(f"Request body is not valid JSON: {err}") from None
        if not isinstance(obj, dict):
            raise BadRequest("Request body must be a JSON object.")
        return obj

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self._started = True
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, *, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, err: HubError, *, close: bool = False) -> None:
        headers = {"X-Error-Message": header_safe(err.message)}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        if close:
            headers["Connection"] = "close"
        logger.debug("-> %s %s: %s", err.status, err.code or "", err.message)
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers=headers)

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, path: str) -> None:
        route(self, method, path)
