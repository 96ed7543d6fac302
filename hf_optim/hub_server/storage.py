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

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hf_optim.hub_server.blobs import BlobStore, atomic_write_json, read_json
from hf_optim.hub_server.records import (
    DEFAULT_BRANCH,
    DEFAULT_USER,
    HEX_RE,
    MARKER_NAME,
    REPO_TYPES,
    STORAGE_FORMAT,
    URL_PREFIXES,
    AddFile,
    BadRequest,
    Commit,
    Conflict,
    DeleteFile,
    EntryNotFound,
    FileEntry,
    Forbidden,
    HubError,
    NotFound,
    NotImplementedOnLocalHub,
    Operation,
    PayloadTooLarge,
    PreconditionFailed,
    RepoNotFound,
    RevisionNotFound,
    Unauthorized,
    decode_content,
    git_blob_sha1,
    lfs_pointer,
    normalize_repo_type,
    now_iso,
    validate_path_in_repo,
    validate_ref_name,
    validate_repo_id,
)
from hf_optim.hub_server.tree import TreeView, file_json, last_commits

try:  # POSIX only: serialise writers across processes as well as threads.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # Windows: no fcntl, threads-only locking

# The names of records.py and tree.py stay importable from here, where they were defined before.
__all__ = [
    "DEFAULT_BRANCH",
    "DEFAULT_USER",
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
    "HubStorage",
    "NotFound",
    "NotImplementedOnLocalHub",
    "Operation",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RepoNotFound",
    "RevisionNotFound",
    "TreeView",
    "Unauthorized",
    "decode_content",
    "file_json",
    "git_blob_sha1",
    "last_commits",
    "lfs_pointer",
    "normalize_repo_type",
    "now_iso",
    "validate_path_in_repo",
    "validate_ref_name",
    "validate_repo_id",
]

_COPY_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class HubStorage(BlobStore):
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
            fmt = read_json(marker).get("format")
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
            atomic_write_json(marker, {"format": STORAGE_FORMAT}, fsync=self.fsync)
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)

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
            return read_json(path)
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {repo_id!r} ({repo_type}) not found.") from None

    def list_repos(self, repo_type: str) -> list[dict[str, Any]]:
        base = self.root / "repos" / f"{normalize_repo_type(repo_type)}s"
        return [read_json(p) for p in sorted(base.glob("*/*/repo.json"))]

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
            atomic_write_json(repo_dir / "repo.json", meta, fsync=self.fsync)
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
            atomic_write_json(target / "repo.json", meta, fsync=self.fsync)

    def update_settings(self, repo_type: str, repo_id: str, *, private: bool | None = None) -> dict[str, Any]:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if private is not None:
                meta["private"] = bool(private)
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
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
        atomic_write_json(repo_dir / "commits" / f"{commit.id}.json", commit.to_json(), fsync=self.fsync)

    def load_commit(self, repo_type: str, repo_id: str, commit_id: str) -> Commit:
        path = self._repo_dir(normalize_repo_type(repo_type), repo_id) / "commits" / f"{commit_id}.json"
        try:
            return Commit.from_json(read_json(path))
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
        if HEX_RE.fullmatch(rev.lower()):
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
            atomic_write_json(repo_dir / "repo.json", meta, fsync=self.fsync)
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
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return target

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if branch == DEFAULT_BRANCH:
                raise Forbidden(f"Cannot delete the default branch {DEFAULT_BRANCH!r}.")
            if branch not in meta["refs"]["heads"]:
                raise RevisionNotFound(f"Branch {branch!r} not found in {repo_id}.")
            del meta["refs"]["heads"][branch]
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)

    def create_tag(self, repo_type: str, repo_id: str, tag: str, revision: str | None) -> str:
        validate_ref_name(tag, "tag")
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if tag in meta["refs"]["tags"]:
                raise Conflict(f"Tag {tag!r} already exists in {repo_id}.")
            target = self.resolve(meta, revision)
            meta["refs"]["tags"][tag] = target
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
            return target

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        with self._write_lock():
            meta = self.get_repo(repo_type, repo_id)
            if tag not in meta["refs"]["tags"]:
                raise RevisionNotFound(f"Tag {tag!r} not found in {repo_id}.")
            del meta["refs"]["tags"][tag]
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)

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
            atomic_write_json(self._meta_path(meta["type"], repo_id), meta, fsync=self.fsync)
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
