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
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from hf_optim.hub_server.body import RequestBody
from hf_optim.hub_server.signing import UrlSigner
from hf_optim.hub_server.storage import (
    DEFAULT_BRANCH,
    DEFAULT_USER,
    URL_PREFIXES,
    AddFile,
    BadRequest,
    Conflict,
    DeleteFile,
    EntryNotFound,
    HubError,
    HubStorage,
    NotFound,
    NotImplementedOnLocalHub,
    Operation,
    PayloadTooLarge,
    RepoNotFound,
    TreeView,
    Unauthorized,
    decode_content,
    last_commits,
    normalize_repo_type,
    validate_path_in_repo,
    validate_repo_id,
)

logger = logging.getLogger("hf_optim.hub_server")

PAGE_SIZE = 1000  # entries per page of tree / commits listings, as on the Hub
EXPAND_PAGE_SIZE = 50
_TYPE_SEGMENTS = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}
JSON_BODY_LIMIT = 16 << 20  # bodies of JSON endpoints (every endpoint but commits and LFS uploads)
DEFAULT_MAX_UPLOAD_SIZE = 50 << 30  # commit bodies and LFS objects (the Hub's per-file limit)
_DRAIN_LIMIT = 1 << 20  # unread body bytes read and dropped to keep a connection alive
_LINGER_LIMIT = 4 << 20  # bytes read and dropped after an error reply, so that the client sees the reply
_LINGER_SECONDS = 2.0
_OID_RE = re.compile(r"[0-9a-f]{64}")
_DIGITS_RE = re.compile(r"[0-9]{1,19}")
_RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class _InternalError(HubError):
    status = 500


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _header_safe(text: str) -> str:
    """One line of latin-1 without control characters, as an HTTP header value must be."""
    text = _CONTROL_RE.sub(" ", " ".join(text.split()))
    return text.encode("latin-1", "replace").decode("latin-1")[:2000]


def _int_field(value: Any, name: str) -> int:
    """A non-negative integer from a JSON body (BadRequest otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name!r} must be a non-negative integer.")
    return value


def _str_field(value: Any, name: str) -> str | None:
    """An optional string from a JSON body (BadRequest for another type)."""
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name!r} must be a string.")
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-optim-local-hub"
    timeout = 300  # idle keep-alive connections are closed after this many seconds
    # Errors found by http.server itself (request line, headers): a short plain message.
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    default_request_version = "HTTP/1.0"  # replies to unparsable request lines get a status line too
    server: _HTTPServer

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
            self._fail(_InternalError("Internal error of the local Hub (details are in the server log)."))
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
        headers = {"X-Error-Message": _header_safe(err.message)}
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
        segs = path.split("/")[1:]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs and segs[0] == "api":
            self._route_api(method, segs[1:])
        else:
            self._route_web(method, segs)

    def _unknown(self, method: str) -> None:
        raise NotFound(f"The local Hub does not implement {method} {urlsplit(self.path).path}.")

    @staticmethod
    def _take_revision(segs: list[str]) -> tuple[str, list[str]]:
        """Revision from URL segments: one percent-encoded segment, or unencoded ``refs/(pr|heads|tags)/x``."""
        if not segs or not segs[0]:
            raise BadRequest("Missing revision in URL.")
        if segs[0] == "refs" and len(segs) >= 3 and segs[1] in ("pr", "heads", "tags", "convert"):
            return f"refs/{segs[1]}/{unquote(segs[2])}", segs[3:]
        return unquote(segs[0]), segs[1:]

    def _route_web(self, method: str, segs: list[str]) -> None:
        repo_type = "model"
        if segs and segs[0] in _URL_TYPE_PREFIXES:
            repo_type = _URL_TYPE_PREFIXES[segs[0]]
            segs = segs[1:]
        if len(segs) < 3:
            self._unknown(method)
        namespace, name, rest = unquote(segs[0]), unquote(segs[1]), segs[2:]
        if name.endswith(".git") and rest[:3] == ["info", "lfs", "objects"]:
            repo_id = f"{namespace}/{name[:-4]}"
            rest = rest[3:]
            if method == "POST" and rest == ["batch"]:
                return self._lfs_batch(repo_type, repo_id)
            if method == "PUT" and len(rest) == 3 and rest[0] == "upload":
                return self._lfs_upload(repo_type, repo_id, rest[1], rest[2])
            if method in ("GET", "HEAD") and len(rest) == 2 and rest[0] == "download":
                return self._lfs_download(repo_type, repo_id, rest[1])
            self._unknown(method)
        repo_id = f"{namespace}/{name}"
        if rest[0] == "resolve" and method in ("GET", "HEAD") and len(rest) >= 3:
            revision, file_segs = self._take_revision(rest[1:])
            return self._resolve(repo_type, repo_id, revision, "/".join(unquote(s) for s in file_segs))
        self._unknown(method)

    def _route_api(self, method: str, segs: list[str]) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(segs) == 2 and segs[0] == "repos":
            if segs[1] == "create" and method == "POST":
                return self._create_repo()
            if segs[1] == "delete" and method == "DELETE":
                return self._delete_repo()
            if segs[1] == "move" and method == "POST":
                return self._move_repo()
        if not segs or segs[0] not in _TYPE_SEGMENTS:
            self._unknown(method)
        repo_type = _TYPE_SEGMENTS[segs[0]]
        if len(segs) == 1 and method == "GET":
            return self._list_repos(repo_type)
        if len(segs) < 3:
            self._unknown(method)
        repo_id = f"{unquote(segs[1])}/{unquote(segs[2])}"
        rest = segs[3:]
        action = rest[0] if rest else ""
        if method == "GET" and not rest:
            return self._repo_info(repo_type, repo_id, None)
        if action.startswith("xet-"):
            logger.warning(
                "a client asked for a xet token (%s %s): the local Hub has no xet; clients uploading LFS files "
                "must set HF_HUB_DISABLE_XET=1",
                method,
                urlsplit(self.path).path,
            )
            raise NotImplementedOnLocalHub(
                "The local Hub does not speak the xet protocol. Set HF_HUB_DISABLE_XET=1 in the client, or start "
                "the server without --lfs-extensions so that every file is uploaded as a regular file."
            )
        if action == "revision" and method == "GET":
            revision, _ = self._take_revision(rest[1:])
            return self._repo_info(repo_type, repo_id, revision)
        if action == "tree" and method == "GET":
            revision, path_segs = self._take_revision(rest[1:])
            return self._tree(repo_type, repo_id, revision, "/".join(unquote(s) for s in path_segs))
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, self._take_revision(rest[1:])[0])
        if action == "refs" and method == "GET" and len(rest) == 1:
            return self._refs(repo_type, repo_id)
        if action == "commits" and method == "GET":
            revision = self._take_revision(rest[1:])[0] if len(rest) > 1 else DEFAULT_BRANCH
            return self._commits(repo_type, repo_id, revision)
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, self._take_revision(rest[1:])[0])
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, self._take_revision(rest[1:])[0])
        if action == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            branch = "/".join(unquote(s) for s in rest[1:])
            return self._branch(method, repo_type, repo_id, branch)
        if action == "tag" and len(rest) >= 2 and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, "/".join(unquote(s) for s in rest[1:]))
        if action == "discussions":
            if method == "POST" and len(rest) == 1:
                return self._create_discussion(repo_type, repo_id)
            if method == "GET" and len(rest) == 2 and _DIGITS_RE.fullmatch(rest[1]):
                return self._discussion(repo_type, repo_id, int(rest[1]))
        if action == "settings" and method == "PUT" and len(rest) == 1:
            return self._settings(repo_type, repo_id)
        self._unknown(method)

    # ------------------------------------------------------------------ account / misc
    def _whoami(self) -> None:
        if self._token() is None or not self._token_ok():
            raise Unauthorized("Invalid credentials in Authorization header")
        user = self.storage.user
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode(), usedforsecurity=False).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _validate_yaml(self) -> None:
        self._json_body()
        self._send_json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ repos
    def _repo_id_from_body(self, body: dict[str, Any]) -> tuple[str, str]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Missing repo 'name' in the request body.")
        organization = _str_field(body.get("organization"), "organization") or self.storage.user
        repo_type = normalize_repo_type(body.get("type"))
        repo_id = f"{organization}/{name}"
        validate_repo_id(repo_id)
        return repo_type, repo_id

    def _create_repo(self) -> None:
        self._require_write()
        body = self._json_body()
        repo_type, repo_id = self._repo_id_from_body(body)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = self._repo_url(repo_type, repo_id)
        try:
            self.storage.create_repo(repo_type, repo_id, private=private)
        except Conflict as err:
            self._send_json({"error": err.message, "url": url}, 409, headers={"X-Error-Message": err.message})
            return
        logger.info("created %s repo %s", repo_type, repo_id)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        repo_type, repo_id = self._repo_id_from_body(self._json_body())
        self.storage.delete_repo(repo_type, repo_id)
        self._send_json({})

    def _move_repo(self) -> None:
        self._require_write()
        body = self._json_body()
        from_id, to_id = body.get("fromRepo"), body.get("toRepo")
        if not isinstance(from_id, str) or not isinstance(to_id, str):
            raise BadRequest("Expected 'fromRepo' and 'toRepo' in the request body.")
        validate_repo_id(to_id)
        self.storage.move_repo(normalize_repo_type(body.get("type")), from_id, to_id)
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        body = self._json_body()
        private: bool | None = None
        if "private" in body:
            private = bool(body["private"])
        if "visibility" in body:
            private = body["visibility"] == "private"
        self.storage.update_settings(repo_type, repo_id, private=private)
        self._send_json({})

    def _list_repos(self, repo_type: str) -> None:
        author = self._query.get("author")
        search = (self._query.get("search") or "").lower()
        limit_text = self._query.get("limit")
        if limit_text is not None and not _DIGITS_RE.fullmatch(limit_text):
            raise BadRequest("'limit' must be a non-negative integer.")
        limit = None if limit_text is None else int(limit_text)
        out = []
        for meta in self.storage.list_repos(repo_type):
            if meta["private"] and not self._token_ok():
                continue
            if author and meta["id"].split("/")[0] != author:
                continue
            if search and search not in meta["id"].lower():
                continue
            out.append(
                {
                    "id": meta["id"],
                    "author": meta["id"].split("/")[0],
                    "sha": meta["refs"]["heads"].get(DEFAULT_BRANCH),
                    "private": meta["private"],
                    "createdAt": meta["createdAt"],
                    "lastModified": meta["lastModified"],
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                }
            )
        self._send_json(out[:limit] if limit is not None else out)

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        commit = self.storage.load_commit(repo_type, repo_id, sha)
        blobs = _truthy(self._query.get("blobs"))
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    # ------------------------------------------------------------------ listings
    def _page(self, items: list[Any], default_size: int) -> tuple[list[Any], dict[str, str]]:
        """Cursor pagination with a GitHub-style ``Link: <...>; rel="next"`` header."""
        cursor_text, size_text = self._query.get("cursor", "0"), self._query.get("limit", str(default_size))
        if not _DIGITS_RE.fullmatch(cursor_text) or not _DIGITS_RE.fullmatch(size_text):
            raise BadRequest("'cursor' and 'limit' must be non-negative integers.")
        cursor, size = int(cursor_text), int(size_text)
        size = max(1, min(size, default_size))
        page = items[cursor : cursor + size]
        headers = {}
        if cursor + size < len(items):
            split = urlsplit(self.path)
            query = {**self._query, "cursor": str(cursor + size), "limit": str(size)}
            headers["Link"] = f'<{self._base_url()}{split.path}?{urlencode(query)}>; rel="next"'
        return page, headers

    def _with_last_commits(
        self, repo_type: str, repo_id: str, sha: str, entries: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        found = last_commits(self.storage, repo_type, repo_id, sha, [e["path"] for e in entries])
        for entry in entries:
            commit = found[entry["path"]]
            entry["lastCommit"] = {"id": commit.id, "title": commit.title, "date": commit.date}
        return entries

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        view = TreeView(self.storage.load_commit(repo_type, repo_id, sha).files)
        path = path.strip("/")
        if not view.is_dir(path):
            raise EntryNotFound(f"{path!r} is not a folder at {revision} in {repo_id}.", commit=sha)
        expand = _truthy(self._query.get("expand"))
        paths = view.listing(path, recursive=_truthy(self._query.get("recursive")))
        page, headers = self._page(paths, EXPAND_PAGE_SIZE if expand else PAGE_SIZE)
        entries = [view.entry_json(p) for p in page]
        if expand:
            entries = self._with_last_commits(repo_type, repo_id, sha, entries)
        self._send_json(entries, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        view = TreeView(self.storage.load_commit(repo_type, repo_id, sha).files)
        body = self._json_body()
        paths = body.get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list):
            raise BadRequest("'paths' must be a list of paths.")
        entries = []
        for p in dict.fromkeys(str(p).strip("/") for p in paths):
            if p and (p in view.files or view.is_dir(p)):
                entries.append(view.entry_json(p))
        if _truthy(str(body.get("expand", "false"))):
            entries = self._with_last_commits(repo_type, repo_id, sha, entries)
        self._send_json(entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        refs = self._read_repo(repo_type, repo_id)["refs"]

        def fmt(kind: str, name: str, target: str) -> dict[str, str]:
            ref = f"refs/{kind}/{name}"
            return {"name": ref if kind == "pr" else name, "ref": ref, "targetCommit": target}

        self._send_json(
            {
                "branches": [fmt("heads", n, t) for n, t in sorted(refs["heads"].items())],
                "converts": [],
                "tags": [fmt("tags", n, t) for n, t in sorted(refs["tags"].items())],
                "pullRequests": [
                    fmt("pr", n, t) for n, t in sorted(refs["pr"].items(), key=lambda x: int(x[0]))
                ],
            }
        )

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        commits = list(self.storage.history(repo_type, repo_id, sha))
        page, headers = self._page(commits, PAGE_SIZE)
        out = []
        for c in page:
            item: dict[str, Any] = {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author, "avatar": None}],
            }
            if "formatted" in (self._query.get("expand[]") or ""):
                item["formatted"] = {"title": c.title, "message": c.message}
            out.append(item)
        self._send_json(out, headers=headers)

    # ------------------------------------------------------------------ downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        entry = self.storage.load_commit(repo_type, repo_id, sha).files.get(path)
        if entry is None:
            raise EntryNotFound(f"{path!r} not found at {revision} in {repo_id}.", commit=sha)
        etag = entry.sha256 if entry.lfs else entry.oid
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        self._send_blob(entry.sha256, entry.size, headers)

    def _send_blob(self, sha256: str, size: int, headers: dict[str, str]) -> None:
        """The blob, whole or one ``Range: bytes=`` range (416 for a malformed or unsatisfiable one)."""
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range", "").strip()
        if range_header.lower().startswith("bytes="):  # other units are ignored, as RFC 9110 allows
            match = _RANGE_RE.fullmatch(range_header.replace(" ", ""))
            first, last = (match.group(1), match.group(2)) if match else ("", "")
            if first:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            elif last:  # suffix range: the last N bytes
                start = max(size - int(last), 0)
            if not (first or last) or start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self._started = True
                return
            status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self._started = True
        if self._method == "HEAD" or length == 0:
            return
        with self.storage.open_blob(sha256) as f:
            self.connection.sendfile(f, start, length)

    # ------------------------------------------------------------------ uploads
    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_write()
        meta = self._read_repo(repo_type, repo_id)
        sha = self.storage.resolve(meta, revision)
        files = self.storage.load_commit(repo_type, repo_id, sha).files
        items = self._json_body().get("files", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise BadRequest("'files' must be a list of {'path': ..., 'size': ...} objects.")
        out = []
        for item in items:
            path = validate_path_in_repo(str(item.get("path", "")))
            mode = self.storage.upload_mode(path, _int_field(item.get("size", 0), "size"))
            existing = files.get(path)
            oid = None
            if existing is not None and existing.lfs == (mode == "lfs"):
                oid = existing.sha256 if existing.lfs else existing.oid
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        """git-LFS batch API: signed upload hrefs for objects the repo lacks, download hrefs for held ones."""
        self._require_write()
        self._read_repo(repo_type, repo_id)
        body = self._json_body()
        operation, requested = body.get("operation"), body.get("objects", [])
        if operation not in ("upload", "download"):
            raise BadRequest(
                f"Unsupported LFS batch operation {str(operation)[:40]!r}: expected 'upload' or 'download'."
            )
        if not isinstance(requested, list) or not all(isinstance(obj, dict) for obj in requested):
            raise BadRequest("'objects' must be a list of {'oid': ..., 'size': ...} objects.")
        base = f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}.git/info/lfs/objects"
        signer = self.server.hub.signer
        objects = []
        for obj in requested:
            oid, size = str(obj.get("oid", "")).lower(), obj.get("size")
            item: dict[str, Any] = {"oid": oid, "size": size if isinstance(size, int) else 0}
            if not _OID_RE.fullmatch(oid) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
                item["error"] = {"code": 422, "message": "Expected a sha256 'oid' and a non-negative 'size'."}
            elif operation == "upload":
                item["authenticated"] = True
                if size > self.server.hub.max_upload_size:
                    item["error"] = {"code": 413, "message": "Object larger than the server's limit."}
                elif not self.storage.repo_has_lfs(repo_type, repo_id, oid):
                    query = signer.query("upload", repo_type, repo_id, oid, size)
                    href = f"{base}/upload/{oid}/{size}?{query}"
                    item["actions"] = {"upload": {"href": href, "expires_in": signer.ttl}}
            elif self.storage.repo_holds_lfs(repo_type, repo_id, oid):
                item["authenticated"] = True
                query = signer.query("download", repo_type, repo_id, oid, self.storage.blob_size(oid))
                href = f"{base}/download/{oid}?{query}"
                item["actions"] = {"download": {"href": href, "expires_in": signer.ttl}}
            else:
                item["error"] = {"code": 404, "message": f"Object {oid} does not exist."}
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str, size_text: str) -> None:
        """PUT of one LFS object: with the signed href the batch endpoint returned, or with the token.

        The content is checked against the sha256 and size named in the URL while it is received, and kept
        private to the repo until one of its commits names it.
        """
        if not _OID_RE.fullmatch(oid) or not _DIGITS_RE.fullmatch(size_text):
            raise BadRequest("LFS upload URL must end with /upload/<sha256>/<size>.")
        size = int(size_text)
        if not self.server.hub.signer.verify("upload", repo_type, repo_id, oid, size, self._query):
            self._require_write()
            self._read_repo(repo_type, repo_id)
        if size > self.server.hub.max_upload_size:
            raise PayloadTooLarge(f"LFS object of {size} bytes exceeds the server's limit.")
        self.body.set_limit(size)
        self.storage.stage_upload(repo_type, repo_id, self.body.read, sha256=oid, size=size)
        self._send_json({})

    def _lfs_download(self, repo_type: str, repo_id: str, oid: str) -> None:
        """GET of an LFS object held by one of the repo's commits (signed href, or read access)."""
        self.storage.get_repo(repo_type, repo_id)
        held = self.storage.repo_holds_lfs(repo_type, repo_id, oid)
        size = self.storage.blob_size(oid) if held else -1
        if not self.server.hub.signer.verify("download", repo_type, repo_id, oid, size, self._query):
            self._read_repo(repo_type, repo_id)
        if not held:
            raise NotFound(f"LFS object {oid} not found in {repo_id}.")
        self._send_blob(oid, size, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        self.body.set_limit(self.server.hub.max_upload_size)
        if "json" in self.headers.get("Content-Type", "") and "ndjson" not in self.headers.get(
            "Content-Type", ""
        ):
            raise BadRequest("The commit endpoint of the local Hub expects an application/x-ndjson body.")
        header: dict[str, Any] | None = None
        operations: list[Operation] = []
        while line := self.body.readline():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise BadRequest(
                    "Malformed NDJSON commit line: expected {'key': ..., 'value': {...}}."
                ) from None
            del line, item  # a regular file's line holds its whole content: keep one copy alive, not three
            if not isinstance(value, dict):
                raise BadRequest(f"Commit line {key!r}: 'value' must be a JSON object.")
            if key == "header":
                header = value
                continue
            path = value.get("path")
            if not isinstance(path, str):
                raise BadRequest(f"Commit operation {key!r} without a 'path'.")
            if key == "file":
                try:
                    content = decode_content(value)
                except ValueError:
                    raise BadRequest(f"Content of {path!r} is not valid base64.") from None
                operations.append(AddFile(validate_path_in_repo(path), self.storage.put_bytes(content)))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise BadRequest(f"LFS file {path!r}: only algo 'sha256' is supported.")
                size = value.get("size")
                entry = self.storage.lfs_entry(
                    repo_type,
                    repo_id,
                    str(value.get("oid", "")),
                    None if size is None else _int_field(size, "size"),
                )
                operations.append(AddFile(validate_path_in_repo(path), entry))
            elif key == "deletedFile":
                operations.append(DeleteFile(path))
            elif key == "deletedFolder":
                operations.append(DeleteFile(path, folder=True))
            else:
                raise BadRequest(f"Unknown commit operation {key!r}.")
        if header is None:
            raise BadRequest("The commit payload has no 'header' line (summary, description).")
        commit, pr_num = self.storage.commit(
            repo_type,
            repo_id,
            revision,
            operations,
            summary=str(header.get("summary") or ""),
            description=str(header.get("description") or ""),
            parent_commit=_str_field(header.get("parentCommit"), "parentCommit"),
            create_pr=_truthy(self._query.get("create_pr")),
        )
        repo_url = self._repo_url(repo_type, repo_id)
        logger.info("commit %s on %s@%s (%d operations)", commit.id[:8], repo_id, revision, len(operations))
        self._send_json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{repo_url}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    # ------------------------------------------------------------------ refs
    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        if method == "DELETE":
            self.storage.delete_branch(repo_type, repo_id, branch)
        else:
            body = self._json_body()
            starting_point = _str_field(body.get("startingPoint"), "startingPoint")
            self.storage.create_branch(repo_type, repo_id, branch, starting_point)
        self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, name: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        if method == "DELETE":
            self.storage.delete_tag(repo_type, repo_id, name)
        else:
            body = self._json_body()
            tag = body.get("tag")
            if not isinstance(tag, str):
                raise BadRequest("Expected a 'tag' name in the request body.")
            self.storage.create_tag(repo_type, repo_id, tag, name)
        self._send_json({})

    def _create_discussion(self, repo_type: str, repo_id: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        body = self._json_body()
        pull_request = bool(body.get("pullRequest"))
        num = self.storage.create_discussion(
            repo_type,
            repo_id,
            title=str(body.get("title") or ""),
            description=str(body.get("description") or ""),
            pull_request=pull_request,
        )
        url = f"{self._repo_url(repo_type, repo_id)}/discussions/{num}"
        self._send_json({"num": num, "pullRequest": pull_request, "url": url})

    def _discussion(self, repo_type: str, repo_id: str, num: int) -> None:
        meta = self._read_repo(repo_type, repo_id)
        d = self.storage.get_discussion(meta, num)
        out: dict[str, Any] = {
            "num": d["num"],
            "title": d["title"],
            "status": d["status"],
            "isPullRequest": d["isPullRequest"],
            "createdAt": d["createdAt"],
            "author": {"name": d["author"]},
            "repo": {"name": repo_id, "type": repo_type},
            "events": [],
            "pinned": False,
        }
        if d["isPullRequest"]:
            out["changes"] = {"base": d["base"]}
            out["filesWithConflicts"] = []
            out["diff"] = ""
        self._send_json(out)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    hub: LocalHubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("local Hub: connection error from %s", client_address, exc_info=True)


class _HTTPServer6(_HTTPServer):
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
        server_cls = _HTTPServer6 if ":" in host else _HTTPServer
        if listen_socket is not None:
            server_cls = _HTTPServer6 if listen_socket.family == socket.AF_INET6 else _HTTPServer
            self._httpd = server_cls(listen_socket.getsockname()[:2], _Handler, bind_and_activate=False)
            self._httpd.socket.close()
            self._httpd.socket = listen_socket
            self._httpd.server_address = listen_socket.getsockname()[:2]
        else:
            self._httpd = server_cls((host, int(port)), _Handler)
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
