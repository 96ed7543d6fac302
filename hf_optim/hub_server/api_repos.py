"""The local Hub's account, repo and listing endpoints: ``whoami``, repo create / delete / move / settings, repo
info, listings of repos, trees, paths, refs and commits, branches, tags and discussions (pull requests)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import urlencode, urlsplit

from hf_optim.hub_server.handler import (
    DIGITS_RE,
    EXPAND_PAGE_SIZE,
    PAGE_SIZE,
    BaseHandler,
    str_field,
    truthy,
)
from hf_optim.hub_server.records import (
    DEFAULT_BRANCH,
    BadRequest,
    Conflict,
    EntryNotFound,
    Unauthorized,
    normalize_repo_type,
    validate_repo_id,
)
from hf_optim.hub_server.tree import TreeView, last_commits

logger = logging.getLogger("hf_optim.hub_server")

__all__ = ["RepoApi"]


class RepoApi(BaseHandler):
    """Handlers of the account, repo, listing and ref endpoints."""

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
        organization = str_field(body.get("organization"), "organization") or self.storage.user
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
        if limit_text is not None and not DIGITS_RE.fullmatch(limit_text):
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
        blobs = truthy(self._query.get("blobs"))
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
        if not DIGITS_RE.fullmatch(cursor_text) or not DIGITS_RE.fullmatch(size_text):
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
        expand = truthy(self._query.get("expand"))
        paths = view.listing(path, recursive=truthy(self._query.get("recursive")))
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
        if truthy(str(body.get("expand", "false"))):
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

    # ------------------------------------------------------------------ refs
    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        if self._method == "DELETE":
            self.storage.delete_branch(repo_type, repo_id, branch)
        else:
            body = self._json_body()
            starting_point = str_field(body.get("startingPoint"), "startingPoint")
            self.storage.create_branch(repo_type, repo_id, branch, starting_point)
        self._send_json({})

    def _tag(self, repo_type: str, repo_id: str, name: str) -> None:
        self._require_write()
        self._read_repo(repo_type, repo_id)
        if self._method == "DELETE":
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
