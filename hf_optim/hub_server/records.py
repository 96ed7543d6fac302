"""The local Hub's vocabulary: its errors (each with the HTTP status and error code the client expects), the
name and path checks, and the records a repo is made of (:class:`FileEntry`, :class:`Commit`, commit
operations)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_BRANCH",
    "DEFAULT_USER",
    "HEX_RE",
    "MARKER_NAME",
    "REPO_TYPES",
    "STORAGE_FORMAT",
    "URL_PREFIXES",
    "AddFile",
    "BadRequest",
    "Commit",
    "Conflict",
    "DeleteFile",
    "EntryNotFound",
    "FileEntry",
    "Forbidden",
    "HubError",
    "NotFound",
    "NotImplementedOnLocalHub",
    "Operation",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RepoNotFound",
    "RevisionNotFound",
    "Unauthorized",
    "decode_content",
    "git_blob_sha1",
    "lfs_pointer",
    "normalize_repo_type",
    "now_iso",
    "validate_path_in_repo",
    "validate_ref_name",
    "validate_repo_id",
]

STORAGE_FORMAT = 1
MARKER_NAME = "hf-optim-hub.json"
DEFAULT_USER = "local-user"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space", "kernel")
# URL prefix of each repo type on the Hub (models have none), as in huggingface_hub.constants.
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF_NAME_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}")
HEX_RE = re.compile(r"[0-9a-f]{7,40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """An error the server reports to the client: HTTP status, Hub error code (``X-Error-Code``) and message."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, *, commit: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.commit = commit  # sent as X-Repo-Commit (EntryNotFound must carry it)


class BadRequest(HubError):
    status = 400


class Unauthorized(HubError):
    status = 401


class Forbidden(HubError):
    status = 403


class NotFound(HubError):
    status = 404


class RepoNotFound(HubError):
    status = 404
    code = "RepoNotFound"


class RevisionNotFound(HubError):
    status = 404
    code = "RevisionNotFound"


class EntryNotFound(HubError):
    status = 404
    code = "EntryNotFound"


class Conflict(HubError):
    status = 409


class PreconditionFailed(HubError):
    status = 412


class PayloadTooLarge(HubError):
    status = 413


class NotImplementedOnLocalHub(HubError):
    status = 501


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content (what ``git hash-object`` prints)."""
    digest = hashlib.sha1(b"blob %d\0" % len(data), usedforsecurity=False)
    digest.update(data)  # no concatenation: data may be hundreds of MB
    return digest.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    """Current UTC time in the Hub's format (``2024-01-31T12:00:00.000Z``)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def normalize_repo_type(repo_type: str | None) -> str:
    """``None`` -> ``"model"``; plural forms (``"datasets"``) accepted; anything else is a BadRequest."""
    if repo_type is None:
        return "model"
    if not isinstance(repo_type, str):
        raise BadRequest("The repo type must be a string.")
    singular = repo_type[:-1] if repo_type.endswith("s") else repo_type
    if singular not in REPO_TYPES:
        raise BadRequest(f"Invalid repo type {repo_type!r}: expected one of {', '.join(REPO_TYPES)}.")
    return singular


def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """Split ``namespace/name`` and check both parts (letters, digits, ``._-``; no ``--`` or ``..``)."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise BadRequest(f"Invalid repo id {repo_id!r}: expected 'namespace/name'.")
    for part in parts:
        if not _NAME_RE.fullmatch(part) or ".." in part or "--" in part or part.endswith(".git"):
            raise BadRequest(
                f"Invalid repo id {repo_id!r}: each part must be 1-96 characters among letters, digits, '.', "
                "'_' and '-', start with a letter or digit, and contain neither '--' nor '..' nor end in '.git'."
            )
    return parts[0], parts[1]


def validate_path_in_repo(path: str) -> str:
    """A file path inside a repo: relative, '/'-separated, no empty, '.' or '..' segment."""
    if not path or path.startswith("/") or path.endswith("/") or "\\" in path or "\0" in path:
        raise BadRequest(f"Invalid path in repo {path!r}: expected a relative '/'-separated file path.")
    if any(seg in ("", ".", "..") for seg in path.split("/")) or path == ".git" or path.startswith(".git/"):
        raise BadRequest(
            f"Invalid path in repo {path!r}: empty, '.', '..' or '.git' segments are not allowed."
        )
    return path


def validate_ref_name(name: str, kind: str) -> str:
    """A branch or tag name: no spaces, no '..', not ``refs/...`` and not something that looks like a commit id."""
    if (
        not _REF_NAME_RE.fullmatch(name)
        or ".." in name
        or "//" in name
        or name.endswith("/")
        or name.startswith("refs/")
        or HEX_RE.fullmatch(name) is not None
    ):
        raise BadRequest(
            f"Invalid {kind} name {name!r}: use letters, digits, '.', '_', '-' and '/', not 'refs/...' "
            "and not a hexadecimal string (it would be ambiguous with a commit id)."
        )
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree."""

    sha256: str  # content digest; names the blob on disk
    size: int  # content size in bytes
    oid: str  # git blob sha1 (of the content, or of the LFS pointer for LFS files)
    lfs: bool = False

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "oid": self.oid, "lfs": self.lfs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileEntry:
        return cls(sha256=data["sha256"], size=int(data["size"]), oid=data["oid"], lfs=bool(data["lfs"]))


@dataclass(frozen=True)
class Commit:
    """An immutable commit: its id, parents, message and full tree (path -> FileEntry)."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": list(self.parents),
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        return cls(
            id=data["id"],
            parents=tuple(data["parents"]),
            title=data["title"],
            message=data["message"],
            author=data["author"],
            date=data["date"],
            files={path: FileEntry.from_json(entry) for path, entry in data["files"].items()},
        )


@dataclass(frozen=True)
class AddFile:
    """Commit operation: put the blob ``entry`` at ``path``."""

    path: str
    entry: FileEntry


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: delete the file ``path`` (``folder=True``: every file under ``path/``)."""

    path: str
    folder: bool = False


Operation = AddFile | DeleteFile


def decode_content(value: dict[str, Any]) -> bytes:
    """Content of an NDJSON ``file`` line (``encoding`` base64 or utf-8)."""
    encoding = value.get("encoding", "base64")
    content = value.pop("content", "")
    if not isinstance(content, str):
        raise BadRequest(f"Content of {value.get('path')!r} must be a string.")
    if encoding == "base64":
        return base64.b64decode(content, validate=True)
    if encoding in ("utf-8", "utf8"):
        return content.encode("utf-8")
    raise BadRequest(
        f"Unknown content encoding {encoding!r} for {value.get('path')!r}: expected base64 or utf-8."
    )
