"""On-disk storage of the local Hub: content-addressed blobs, one JSON file per commit, refs in one JSON per repo.

Layout under ``root``::

    hf-optim-hub.json                       marker with the storage format version
    blobs/<sha256[:2]>/<sha256>             file contents, shared by every repo (never rewritten)
    repos/<type>s/<namespace>/<name>/
        repo.json                           id, type, private, dates, refs (heads / tags / pr), discussions
        commits/<commit id>.json            one immutable file per commit: parents, message, full file tree
        lfs-objects/<sha256>                empty marker: a commit of this repo holds this LFS object
        uploads/<sha256>                    LFS object uploaded to this repo, not committed yet
    tmp/                                    temporary files, renamed into place once complete

Blobs are shared, but a blob is only ever reached through a repo: a file of one of its commits, or an LFS
object named in ``lfs-objects/``. An LFS upload lands in the repo's ``uploads/`` and joins the shared store
when a commit of that repo references it, so an uploaded-but-uncommitted object is reachable through no repo
and knowing an object's sha256 gives access to nothing (``prune_uploads`` removes stale uploads).

Every write goes to a temporary file first and is renamed into place (``os.replace``), so a reader never
sees a partial file and a failed request changes nothing. Mutations of ``repo.json`` happen under a lock
(a thread lock, plus ``fcntl.flock`` on ``root/.lock`` where available, so two processes serving the same
root do not interleave their ref updates). Commit ids are 40-hex sha1 digests of the commit's content;
file ``oid`` values follow git: the git blob sha1 of the content for regular files, of the LFS pointer
file for LFS files (whose content is identified by its sha256).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

try:  # POSIX only: serialise writers across processes as well as threads.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # Windows: no fcntl, threads-only locking

STORAGE_FORMAT = 1
MARKER_NAME = "hf-optim-hub.json"
DEFAULT_USER = "local-user"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space", "kernel")
# URL prefix of each repo type on the Hub (models have none), as in huggingface_hub.constants.
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF_NAME_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}")
_HEX_RE = re.compile(r"[0-9a-f]{7,40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 1 << 20


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
        or _HEX_RE.fullmatch(name) is not None
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


def _atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_write_json(path: Path, obj: Any, *, fsync: bool = True) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), fsync=fsync)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class HubStorage:
    """Repos, commits, refs and blobs of the local Hub, persisted under ``root``.

    ``lfs_extensions``: file-name suffixes (e.g. ``".safetensors"``) that the server asks clients to upload
    through the LFS protocol; ``"*"`` means every non-empty file. Default: none (everything is a regular
    file, which is what lets the client work with xet enabled). ``fsync``: flush every written file to disk
    before it is renamed into place (durable across power loss; slow for many small files). Without it,
    writes are still atomic for readers and across crashes of the server process.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        lfs_extensions: Iterable[str] = (),
        user: str = DEFAULT_USER,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.fsync = fsync
        self.user = user
        try:
            validate_repo_id(f"{user}/x")  # the user name is a namespace: same rules
        except BadRequest:
            raise ValueError(
                f"--user {user!r}: expected letters, digits, '.', '_' and '-' (a valid namespace)"
            ) from None
        self.lfs_extensions = tuple(_normalize_extension(ext) for ext in lfs_extensions)
        self._lock = threading.RLock()
        self._init_root()

    # ------------------------------------------------------------------ layout
    def _init_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"--root {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER_NAME
        if marker.exists():
            fmt = _read_json(marker).get("format")
            if fmt != STORAGE_FORMAT:
                raise ValueError(
                    f"--root {self.root} holds a local Hub in storage format {fmt!r}; this version reads "
                    f"format {STORAGE_FORMAT}."
                )
        else:
            others = [p.name for p in self.root.iterdir() if p.name not in ("blobs", "repos", "tmp", ".lock")]
            if others:
                raise ValueError(
                    f"--root {self.root} is neither empty nor a local Hub (found {', '.join(sorted(others)[:5])}): "
                    "pick an empty or new directory."
                )
            _atomic_write_json(marker, {"format": STORAGE_FORMAT}, fsync=self.fsync)
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = validate_repo_id(repo_id)
        return self.root / "repos" / f"{repo_type}s" / namespace / name

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None:
                yield
                return
            with open(self.root / ".lock", "a+b") as lock_file:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ blobs
    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether the content with this sha256 (and size, if given) is stored."""
        if not _SHA256_RE.fullmatch(sha256):
            return False
        try:
            actual = self._blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    def blob_size(self, sha256: str) -> int:
        return self._blob_path(sha256).stat().st_size

    def open_blob(self, sha256: str) -> BinaryIO:
        return open(self._blob_path(sha256), "rb")

    def read_blob(self, sha256: str) -> bytes:
        with self.open_blob(sha256) as f:
            return f.read()

    def put_bytes(self, data: bytes) -> FileEntry:
        """Store ``data`` as a regular file's content; returns its tree entry."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256, len(data)):
            _atomic_write_bytes(self._blob_path(sha256), data, fsync=self.fsync)
        return FileEntry(sha256=sha256, size=len(data), oid=git_blob_sha1(data), lfs=False)

    @contextlib.contextmanager
    def _received(
        self, read: Callable[[int], bytes], expected_sha256: str | None, expected_size: int | None
    ) -> Iterator[tuple[Path, str, int]]:
        """Stream ``read`` into a temporary file, checked against the expected digest and size.

        Reading stops as soon as the content outgrows ``expected_size``. Yields (temporary path, sha256,
        size); the temporary file is removed on exit unless it was moved away.
        """
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix="upload-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := read(_COPY_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise BadRequest(f"Uploaded content exceeds the expected {expected_size} bytes.")
                    f.write(chunk)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            sha256 = digest.hexdigest()
            if expected_size is not None and size != expected_size:
                raise BadRequest(f"Uploaded content has {size} bytes, expected {expected_size}.")
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise BadRequest(f"Uploaded content has sha256 {sha256}, expected {expected_sha256}.")
            yield tmp, sha256, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # ------------------------------------------------------------------ LFS objects of a repo
    def stage_upload(
        self, repo_type: str, repo_id: str, read: Callable[[int], bytes], *, sha256: str, size: int
    ) -> None:
        """Receive an LFS object uploaded to a repo; it stays private to the repo until a commit names it.

        The content must have exactly this sha256 and size (BadRequest otherwise, nothing is kept).
        """
        repo_type = normalize_repo_type(repo_type)
        self.get_repo(repo_type, repo_id)
        if not _SHA256_RE.fullmatch(sha256) or size < 0:
            raise BadRequest("An LFS object is named by a sha256 and a non-negative size.")
        with self._received(read, sha256, size) as (tmp, _, _):
            target = self._repo_dir(repo_type, repo_id) / "uploads" / sha256
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)

    def _lfs_markers(self, repo_type: str, repo_id: str) -> Path:
        """The repo's ``lfs-objects/`` folder, built from its commits if the repo predates it."""
        repo_dir = self._repo_dir(repo_type, repo_id)
        markers = repo_dir / "lfs-objects"
        if not markers.is_dir():
            self.get_repo(repo_type, repo_id)  # RepoNotFound rather than a folder in a missing repo
            building = Path(tempfile.mkdtemp(dir=repo_dir, prefix=".lfs-objects-"))
            for path in (repo_dir / "commits").glob("*.json"):
                for entry in _read_json(path)["files"].values():
                    if entry.get("lfs"):
                        (building / entry["sha256"]).touch()
            try:
                os.rename(building, markers)
            except OSError:  # built concurrently by another request
                shutil.rmtree(building, ignore_errors=True)
        return markers

    def repo_holds_lfs(self, repo_type: str, repo_id: str, sha256: str) -> bool:
        """Whether a commit of this repo (reachable or not from its refs) holds this LFS object."""
        if not _SHA256_RE.fullmatch(sha256):
            return False
        return (self._lfs_markers(normalize_repo_type(repo_type), repo_id) / sha256).exists()

    def _staged(self, repo_type: str, repo_id: str, sha256: str) -> Path | None:
        path = self._repo_dir(repo_type, repo_id) / "uploads" / sha256
        return path if _SHA256_RE.fullmatch(sha256) and path.is_file() else None

    def repo_has_lfs(self, repo_type: str, repo_id: str, sha256: str) -> bool:
        """Whether a commit of this repo may name the LFS object: committed before, or uploaded to it."""
        repo_type = normalize_repo_type(repo_type)
        return (
            self.repo_holds_lfs(repo_type, repo_id, sha256)
            or self._staged(repo_type, repo_id, sha256) is not None
        )

    def lfs_entry(self, repo_type: str, repo_id: str, sha256: str, size: int | None = None) -> FileEntry:
        """Tree entry for an LFS object this repo holds or received; BadRequest if it was never uploaded to it."""
        repo_type = normalize_repo_type(repo_type)
        sha256 = sha256.lower()
        if self.repo_holds_lfs(repo_type, repo_id, sha256):
            actual = self.blob_size(sha256)
        else:
            staged = self._staged(repo_type, repo_id, sha256)
            if staged is None:
                raise BadRequest(
                    f"LFS object {sha256} was not uploaded to {repo_id} "
                    "(POST .../info/lfs/objects/batch, then PUT)."
                )
            actual = staged.stat().st_size
        if size is not None and size != actual:
            raise BadRequest(f"LFS object {sha256} has {actual} bytes, the commit says {size}.")
        return FileEntry(sha256=sha256, size=actual, oid=git_blob_sha1(lfs_pointer(sha256, actual)), lfs=True)

    def _adopt_uploads(self, repo_type: str, repo_id: str, entries: Iterable[FileEntry]) -> list[str]:
        """Move the staged uploads among ``entries`` into the shared store; returns their sha256s.

        Called under the write lock, once the commit passed every check. The caller marks them as held by
        the repo once the commit is written.
        """
        adopted = []
        for entry in entries:
            if not entry.lfs or self.repo_holds_lfs(repo_type, repo_id, entry.sha256):
                continue
            staged = self._staged(repo_type, repo_id, entry.sha256)
            if staged is None:
                raise BadRequest(f"LFS object {entry.sha256} was not uploaded to {repo_id}.")
            if self.has_blob(entry.sha256, entry.size):
                staged.unlink()
            else:
                self._blob_path(entry.sha256).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, self._blob_path(entry.sha256))
            adopted.append(entry.sha256)
        return adopted

    def prune_uploads(self, max_age: float = 24 * 3600.0) -> int:
        """Delete uploaded LFS objects no commit used within ``max_age`` seconds; returns how many."""
        deadline = time.time() - max_age
        removed = 0
        for path in self.root.glob("repos/*/*/*/uploads/*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
        return removed

    def upload_mode(self, path: str, size: int) -> str:
        """``"lfs"`` if ``path`` ends with one of the LFS extensions (and is not empty), else ``"regular"``."""
        if size > 0 and any(ext == "*" or path.lower().endswith(ext) for ext in self.lfs_extensions):
            return "lfs"
        return "regular"

    # ------------------------------------------------------------------ repos
    def _meta_path(self, repo_type: str, repo_id: str) -> Path:
        return self._repo_dir(repo_type, repo_id) / "repo.json"

    def get_repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo's metadata (``repo.json``); RepoNotFound if it does not exist."""
        repo_type = normalize_repo_type(repo_type)
        try:
            path = self._meta_path(repo_type, repo_id)
        except BadRequest:
            raise RepoNotFound(f"Repository {repo_id!r} ({repo_type}) not found.") from None
        try:
            return _read_json(path)
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {repo_id!r} ({repo_type}) not found.") from None

    def list_repos(self, repo_type: str) -> list[dict[str, Any]]:
        base = self.root / "repos" / f"{normalize_repo_type(repo_type)}s"
        return [_read_json(p) for p in sorted(base.glob("*/*/repo.json"))]

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False) -> dict[str, Any]:
        """Create a repo with an initial commit holding ``.gitattributes``; Conflict if it already exists."""
        repo_type = normalize_repo_type(repo_type)
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._write_lock():
            if (repo_dir / "repo.json").exists():
                raise Conflict(f"You already created this {repo_type} repo: {repo_id}")
            date = now_iso()
            entry = self.put_bytes(self._gitattributes())
            commit = self._make_commit(
                parents=(), files={".gitattributes": entry}, title="initial commit", message="", date=date
            )
            self._write_commit(repo_dir, commit)
            (repo_dir / "lfs-objects").mkdir()
            meta = {
                "id": repo_id,
                "type": repo_type,
                "private": bool(private),
                "createdAt": date,
                "lastModified": date,
                "refs": {"heads": {DEFAULT_BRANCH: commit.id}, "tags": {}, "pr": {}},
                "discussions": {},
            }
            _atomic_write_json(repo_dir / "repo.json", meta, fsync=self.fsync)
            return meta

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Delete a repo (its blobs stay in the shared store). RepoNotFound if it does not exist."""
        repo_type = normalize_repo_type(repo_type)
        with self._write_lock():
            self.get_repo(repo_type, repo_id)
            repo_dir = self._repo_dir(repo_type, repo_id)
            trash = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="deleted-"))
            os.replace(repo_dir, trash / "repo")  # atomic: the repo disappears at once
        shutil.rmtree(trash, ignore_errors=True)

    def move_repo(self, repo_type: str, from_id: str, to_id: str) -> None:
        repo_type = normalize_repo_type(repo_type)
        with self._write_lock():
            meta = self.get_repo(repo_type, from_id)
            target = self._repo_dir(repo_type, to_id)
            if target.exists():
                raise Conflict(
                    f"Cannot move {from_id} to {to_id}: a {repo_type} repo {to_id} already exists."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._repo_dir(repo_type, from_id), target)
            meta["id"] = to_id
            _atomic_write_json(target / "repo.json", meta, fsync=self.fsync)

    def update_settings(self, repo_type: str, repo_id: str, *, private: bool | None = None) -> dict[str, Any]:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if private is not None:
                meta["private"] = bool(private)
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return meta

    def _gitattributes(self) -> bytes:
        lines = ["# Files stored with Git LFS by this hf-optim local Hub (--lfs-extensions)."]
        for ext in self.lfs_extensions:
            pattern = "*" if ext == "*" else f"*{ext}"
            lines.append(f"{pattern} filter=lfs diff=lfs merge=lfs -text")
        return ("\n".join(lines) + "\n").encode()

    # ------------------------------------------------------------------ commits
    def _make_commit(
        self, *, parents: tuple[str, ...], files: dict[str, FileEntry], title: str, message: str, date: str
    ) -> Commit:
        body = {
            "parents": list(parents),
            "title": title,
            "message": message,
            "author": self.user,
            "date": date,
            "files": {path: entry.to_json() for path, entry in sorted(files.items())},
        }
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
        return Commit(
            id=commit_id,
            parents=parents,
            title=title,
            message=message,
            author=self.user,
            date=date,
            files=files,
        )

    def _write_commit(self, repo_dir: Path, commit: Commit) -> None:
        _atomic_write_json(repo_dir / "commits" / f"{commit.id}.json", commit.to_json(), fsync=self.fsync)

    def load_commit(self, repo_type: str, repo_id: str, commit_id: str) -> Commit:
        path = self._repo_dir(normalize_repo_type(repo_type), repo_id) / "commits" / f"{commit_id}.json"
        try:
            return Commit.from_json(_read_json(path))
        except FileNotFoundError:
            raise RevisionNotFound(f"Commit {commit_id} not found in {repo_id}.") from None

    def resolve(self, meta: dict[str, Any], revision: str | None) -> str:
        """Commit id for a branch, tag, ``refs/heads|tags|pr/...`` or a (7 to 40 hex) commit id prefix."""
        rev = DEFAULT_BRANCH if revision is None else revision
        refs = meta["refs"]
        for prefix, kind in (("refs/heads/", "heads"), ("refs/tags/", "tags"), ("refs/pr/", "pr")):
            if rev.startswith(prefix) and rev[len(prefix) :] in refs[kind]:
                return refs[kind][rev[len(prefix) :]]
        if rev in refs["heads"]:
            return refs["heads"][rev]
        if rev in refs["tags"]:
            return refs["tags"][rev]
        if _HEX_RE.fullmatch(rev.lower()):
            commits_dir = self._repo_dir(meta["type"], meta["id"]) / "commits"
            matches = [p.stem for p in commits_dir.glob(f"{rev.lower()}*.json")]
            if len(matches) == 1:
                return matches[0]
        raise RevisionNotFound(
            f"Invalid rev id: {rev} (no such branch, tag, pull request or commit in {meta['id']})."
        )

    def history(self, repo_type: str, repo_id: str, commit_id: str) -> Iterator[Commit]:
        """Commits reachable from ``commit_id`` following first parents, newest first."""
        current: str | None = commit_id
        while current is not None:
            commit = self.load_commit(repo_type, repo_id, current)
            yield commit
            current = commit.parents[0] if commit.parents else None

    def _target_ref(self, meta: dict[str, Any], revision: str) -> tuple[str, str]:
        """(kind, name) of the ref a commit can be pushed to: a branch or a pull request ref."""
        refs = meta["refs"]
        if revision.startswith("refs/pr/") and revision[len("refs/pr/") :] in refs["pr"]:
            return "pr", revision[len("refs/pr/") :]
        name = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if name in refs["heads"]:
            return "heads", name
        self.resolve(meta, revision)  # RevisionNotFound if it does not exist at all
        raise BadRequest(
            f"Invalid rev id: {revision} is not a branch or a pull request: cannot commit to it."
        )

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        operations: list[Operation],
        *,
        summary: str,
        description: str = "",
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, int | None]:
        """Apply ``operations`` on top of ``revision`` (a branch or ``refs/pr/N``) and move that ref.

        ``create_pr``: commit on top of the branch (or of ``parent_commit``) and open a pull request whose ref
        ``refs/pr/N`` points to the new commit; the branch does not move. Otherwise ``parent_commit``, if
        given, must be the branch head (PreconditionFailed if it moved). Returns (commit, PR number or None).
        Every check happens before anything is written: a failed commit changes nothing.
        """
        repo_type = normalize_repo_type(repo_type)
        if not summary:
            raise BadRequest("The commit summary (commit_message) must not be empty.")
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            kind, name = self._target_ref(meta, revision)
            head = meta["refs"][kind][name]
            if create_pr:
                if kind != "heads":
                    raise RevisionNotFound(
                        f"Cannot open a pull request against {revision}: it is not a branch."
                    )
                base = self.resolve(meta, parent_commit) if parent_commit else head
            else:
                if parent_commit is not None and not head.startswith(parent_commit.lower()):
                    raise PreconditionFailed(
                        f"A commit has happened since {parent_commit}: {revision} now points to {head}. "
                        "Fetch the new head and retry."
                    )
                base = head
            files = dict(self.load_commit(repo_type, repo_id, base).files)
            for op in operations:
                _apply(files, op, commit=base)
            _check_tree(files)
            date = now_iso()
            commit = self._make_commit(
                parents=(base,), files=files, title=summary, message=description or "", date=date
            )
            adopted = self._adopt_uploads(
                repo_type, repo_id, [op.entry for op in operations if isinstance(op, AddFile)]
            )
            repo_dir = self._repo_dir(repo_type, repo_id)
            self._write_commit(repo_dir, commit)
            markers = self._lfs_markers(repo_type, repo_id)
            for sha256 in adopted:
                (markers / sha256).touch()
            pr_num: int | None = None
            if create_pr:
                pr_num = self._new_discussion(
                    meta, title=summary, description=description, pull_request=True, base=name, date=date
                )
                meta["refs"]["pr"][str(pr_num)] = commit.id
            else:
                meta["refs"][kind][name] = commit.id
            meta["lastModified"] = date
            _atomic_write_json(repo_dir / "repo.json", meta, fsync=self.fsync)
            return commit, pr_num

    # ------------------------------------------------------------------ refs
    def create_branch(
        self, repo_type: str, repo_id: str, branch: str, starting_point: str | None = None
    ) -> str:
        validate_ref_name(branch, "branch")
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if branch in meta["refs"]["heads"]:
                raise Conflict(f"Reference refs/heads/{branch} already exists in {repo_id}.")
            target = self.resolve(meta, starting_point)
            meta["refs"]["heads"][branch] = target
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return target

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if branch == DEFAULT_BRANCH:
                raise Forbidden(f"Cannot delete the default branch {DEFAULT_BRANCH!r}.")
            if branch not in meta["refs"]["heads"]:
                raise RevisionNotFound(f"Branch {branch!r} not found in {repo_id}.")
            del meta["refs"]["heads"][branch]
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)

    def create_tag(self, repo_type: str, repo_id: str, tag: str, revision: str | None) -> str:
        validate_ref_name(tag, "tag")
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if tag in meta["refs"]["tags"]:
                raise Conflict(f"Tag {tag!r} already exists in {repo_id}.")
            target = self.resolve(meta, revision)
            meta["refs"]["tags"][tag] = target
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return target

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if tag not in meta["refs"]["tags"]:
                raise RevisionNotFound(f"Tag {tag!r} not found in {repo_id}.")
            del meta["refs"]["tags"][tag]
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)

    # ------------------------------------------------------------------ discussions / pull requests
    def _new_discussion(
        self, meta: dict[str, Any], *, title: str, description: str, pull_request: bool, base: str, date: str
    ) -> int:
        num = max((int(n) for n in meta["discussions"]), default=0) + 1
        meta["discussions"][str(num)] = {
            "num": num,
            "title": title,
            "description": description,
            "isPullRequest": pull_request,
            "status": "open",
            "author": self.user,
            "createdAt": date,
            "base": f"refs/heads/{base}",
        }
        return num

    def create_discussion(
        self, repo_type: str, repo_id: str, *, title: str, description: str, pull_request: bool
    ) -> int:
        """Open a discussion; a pull request also gets a ``refs/pr/N`` ref at the default branch head."""
        if not title:
            raise BadRequest("A discussion needs a non-empty title.")
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            date = now_iso()
            num = self._new_discussion(
                meta,
                title=title,
                description=description,
                pull_request=pull_request,
                base=DEFAULT_BRANCH,
                date=date,
            )
            if pull_request:
                meta["refs"]["pr"][str(num)] = meta["refs"]["heads"][DEFAULT_BRANCH]
            _atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return num

    def get_discussion(self, meta: dict[str, Any], num: int) -> dict[str, Any]:
        try:
            return meta["discussions"][str(num)]
        except KeyError:
            raise NotFound(f"Discussion #{num} not found in {meta['id']}.") from None


def _normalize_extension(ext: str) -> str:
    ext = ext.strip().lower()
    if not ext:
        raise ValueError("--lfs-extensions: empty extension")
    if ext == "*":
        return ext
    return ext if ext.startswith(".") else "." + ext


def _apply(files: dict[str, FileEntry], op: Operation, *, commit: str) -> None:
    if isinstance(op, AddFile):
        files[validate_path_in_repo(op.path)] = op.entry
        return
    path = op.path.rstrip("/") if op.folder else op.path
    if op.folder:
        doomed = [p for p in files if p.startswith(path + "/")] if path else list(files)
        if not doomed:
            raise EntryNotFound(f"Cannot delete folder {op.path!r}: no such folder.", commit=commit)
        for p in doomed:
            del files[p]
    elif path in files:
        del files[path]
    else:
        raise EntryNotFound(f"Cannot delete {op.path!r}: no such file.", commit=commit)


def _check_tree(files: dict[str, FileEntry]) -> None:
    """A path cannot be a file and a folder at once (git cannot represent it)."""
    folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
    expanded: set[str] = set()
    for folder in folders:
        parts = folder.split("/")
        expanded.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    clash = sorted(expanded & files.keys())
    if clash:
        raise BadRequest(f"{clash[0]!r} would be both a file and a folder.")


# ---------------------------------------------------------------------- tree views (used by the HTTP layer)
def file_json(path: str, entry: FileEntry) -> dict[str, Any]:
    """A file as the Hub's tree / paths-info APIs describe it."""
    out: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if entry.lfs:
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return out


class TreeView:
    """Folder structure of one commit's files: listings, folder oids and paths-info."""

    def __init__(self, files: dict[str, FileEntry]) -> None:
        self.files = files
        self.children: dict[str, set[str]] = {"": set()}
        for path in files:
            parts = path.split("/")
            for i in range(len(parts)):
                parent = "/".join(parts[:i])
                child = "/".join(parts[: i + 1])
                self.children.setdefault(parent, set()).add(child)
                if i < len(parts) - 1:
                    self.children.setdefault(child, set())
        self._oids: dict[str, str] = {}

    def is_dir(self, path: str) -> bool:
        return path in self.children

    def dir_oid(self, path: str) -> str:
        """A git-like tree id: sha1 over the sorted (name, oid) pairs of the folder's children."""
        if path not in self._oids:
            h = hashlib.sha1(usedforsecurity=False)
            for child in sorted(self.children[path]):
                oid = self.files[child].oid if child in self.files else self.dir_oid(child)
                h.update(f"{child.rsplit('/', 1)[-1]}\0{oid}\n".encode())
            self._oids[path] = h.hexdigest()
        return self._oids[path]

    def entry_json(self, path: str) -> dict[str, Any]:
        if path in self.files:
            return file_json(path, self.files[path])
        return {"type": "directory", "oid": self.dir_oid(path), "size": 0, "path": path}

    def listing(self, path: str, *, recursive: bool) -> list[str]:
        """Paths below folder ``path`` (direct children, or everything if recursive): folders first, sorted."""
        if path not in self.children:
            raise KeyError(path)
        out: list[str] = []
        stack = [path]
        while stack:
            folder = stack.pop()
            kids = sorted(self.children[folder], key=lambda p: (p not in self.children, p))
            out.extend(kids)
            if recursive:
                stack.extend(k for k in kids if k in self.children)
        return sorted(out, key=lambda p: (p not in self.children, p)) if recursive else out


def last_commits(
    storage: HubStorage, repo_type: str, repo_id: str, head: str, paths: list[str]
) -> dict[str, Commit]:
    """For each path (file or folder) at ``head``, the newest first-parent commit that changed it."""
    pending = set(paths)
    found: dict[str, Commit] = {}
    previous: Commit | None = None
    previous_view: TreeView | None = None
    for commit in storage.history(repo_type, repo_id, head):
        view = TreeView(commit.files)
        if previous is not None and previous_view is not None:
            for path in list(pending):
                if _entry_oid(previous_view, path) != _entry_oid(view, path):
                    found[path] = previous
                    pending.discard(path)
        if not pending:
            break
        previous, previous_view = commit, view
    if previous is not None:
        for path in pending:  # unchanged since the first commit
            found[path] = previous
    return found


def _entry_oid(view: TreeView, path: str) -> str | None:
    if path in view.files:
        return view.files[path].oid
    return view.dir_oid(path) if view.is_dir(path) else None


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
