"""The local Hub's file endpoints: downloads (``resolve``, ranges), uploads (``preupload``, the LFS batch API and
its signed transfer URLs, NDJSON commits)."""

from __future__ import annotations

import json
import logging
from typing import Any

from hf_optim.hub_server.handler import (
    DIGITS_RE,
    OID_RE,
    RANGE_RE,
    BaseHandler,
    int_field,
    str_field,
    truthy,
)
from hf_optim.hub_server.records import (
    URL_PREFIXES,
    AddFile,
    BadRequest,
    DeleteFile,
    EntryNotFound,
    NotFound,
    Operation,
    PayloadTooLarge,
    decode_content,
    validate_path_in_repo,
)

logger = logging.getLogger("hf_optim.hub_server")

__all__ = ["FileApi"]


class FileApi(BaseHandler):
    """Handlers of the download and upload endpoints."""

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
            match = RANGE_RE.fullmatch(range_header.replace(" ", ""))
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
            mode = self.storage.upload_mode(path, int_field(item.get("size", 0), "size"))
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
            if not OID_RE.fullmatch(oid) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
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
        if not OID_RE.fullmatch(oid) or not DIGITS_RE.fullmatch(size_text):
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
                    None if size is None else int_field(size, "size"),
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
            parent_commit=str_field(header.get("parentCommit"), "parentCommit"),
            create_pr=truthy(self._query.get("create_pr")),
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
