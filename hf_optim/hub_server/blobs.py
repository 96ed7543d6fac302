"""Content-addressed blobs of the local Hub and the LFS objects of each repo (see :mod:`hf_optim.hub_server.storage`
for the layout): storing, reading and staging blobs, and which repo may reach which LFS object."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, BinaryIO

from hf_optim.hub_server.records import (
    BadRequest,
    FileEntry,
    git_blob_sha1,
    lfs_pointer,
    normalize_repo_type,
    validate_repo_id,
)

try:  # POSIX only: serialise writers across processes as well as threads.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # Windows: no fcntl, threads-only locking

__all__ = ["BlobStore", "atomic_write_bytes", "atomic_write_json", "read_json"]

_COPY_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
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


def atomic_write_json(path: Path, obj: Any, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), fsync=fsync)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class BlobStore:
    """The blob and LFS half of :class:`~hf_optim.hub_server.storage.HubStorage` (its base class)."""

    root: Path
    fsync: bool
    lfs_extensions: tuple[str, ...]
    _lock: threading.RLock

    def get_repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo's metadata (``RepoNotFound`` if there is none): implemented by the repo layer."""
        raise NotImplementedError

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
            atomic_write_bytes(self._blob_path(sha256), data, fsync=self.fsync)
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
                for entry in read_json(path)["files"].values():
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
