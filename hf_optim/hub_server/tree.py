"""Views of a commit's file tree for the HTTP layer: entries as the Hub's JSON, folder oids, listings, and the
last commit that changed each path."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from hf_optim.hub_server.records import Commit, FileEntry

if TYPE_CHECKING:
    from hf_optim.hub_server.storage import HubStorage

__all__ = ["TreeView", "file_json", "last_commits"]


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
