"""The local Hub's URL routes, as tables: a request's method and path pick a handler method and its arguments.

Three URL families: ``/api/...`` without a repo (:data:`API_ROUTES`), ``/api/{type}s/{namespace}/{name}/{action}/...``
(:data:`REPO_ROUTES`, keyed by method and action), and the web paths ``/{repo}/resolve/...`` and
``/{repo}.git/info/lfs/objects/...`` (:data:`WEB_ROUTES`, :data:`LFS_ROUTES`). Each row's argument function
turns the remaining URL segments into the handler's arguments after ``repo_type, repo_id``, or returns ``None``
when the segments do not fit (the request is then a 404 naming the method and path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from hf_optim.hub_server.records import DEFAULT_BRANCH, BadRequest, NotFound, NotImplementedOnLocalHub

if TYPE_CHECKING:
    from hf_optim.hub_server.handler import BaseHandler

logger = logging.getLogger("hf_optim.hub_server")

__all__ = ["API_ROUTES", "LFS_ROUTES", "LIST_ROUTE", "REPO_ROUTES", "WEB_ROUTES", "route", "take_revision"]

Args = Callable[[list[str]], tuple[Any, ...] | None]

TYPE_SEGMENTS = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
URL_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}


def take_revision(segs: list[str]) -> tuple[str, list[str]]:
    """Revision from URL segments: one percent-encoded segment, or unencoded ``refs/(pr|heads|tags)/x``."""
    if not segs or not segs[0]:
        raise BadRequest("Missing revision in URL.")
    if segs[0] == "refs" and len(segs) >= 3 and segs[1] in ("pr", "heads", "tags", "convert"):
        return f"refs/{segs[1]}/{unquote(segs[2])}", segs[3:]
    return unquote(segs[0]), segs[1:]


def _joined(segs: list[str]) -> str:
    return "/".join(unquote(s) for s in segs)


def _revision(rest: list[str]) -> tuple[Any, ...]:
    return (take_revision(rest[1:])[0],)


def _revision_and_path(rest: list[str]) -> tuple[Any, ...]:
    revision, path = take_revision(rest[1:])
    return revision, _joined(path)


def _only(length: int) -> Args:
    return lambda rest: () if len(rest) == length else None


def _name(rest: list[str]) -> tuple[Any, ...] | None:
    return (_joined(rest[1:]),) if len(rest) >= 2 else None


def _discussion_number(rest: list[str]) -> tuple[Any, ...] | None:
    return (
        (int(rest[1]),)
        if len(rest) == 2 and rest[1].isascii() and rest[1].isdigit() and len(rest[1]) < 20
        else None
    )


#: ``/api/<segments>`` -> handler method
API_ROUTES: dict[tuple[str, tuple[str, ...]], str] = {
    ("GET", ("whoami-v2",)): "_whoami",
    ("POST", ("validate-yaml",)): "_validate_yaml",
    ("POST", ("repos", "create")): "_create_repo",
    ("DELETE", ("repos", "delete")): "_delete_repo",
    ("POST", ("repos", "move")): "_move_repo",
}

#: ``GET /api/{type}s`` -> handler method
LIST_ROUTE = "_list_repos"

#: ``/api/{type}s/{namespace}/{name}/{action}/...`` -> (handler method, arguments after repo_type, repo_id)
REPO_ROUTES: dict[tuple[str, str], tuple[str, Args]] = {
    ("GET", ""): ("_repo_info", lambda rest: (None,)),
    ("GET", "revision"): ("_repo_info", _revision),
    ("GET", "tree"): ("_tree", _revision_and_path),
    ("POST", "paths-info"): ("_paths_info", _revision),
    ("GET", "refs"): ("_refs", _only(1)),
    ("GET", "commits"): (
        "_commits",
        lambda rest: (take_revision(rest[1:])[0] if len(rest) > 1 else DEFAULT_BRANCH,),
    ),
    ("POST", "preupload"): ("_preupload", _revision),
    ("POST", "commit"): ("_commit", _revision),
    ("POST", "branch"): ("_branch", _name),
    ("DELETE", "branch"): ("_branch", _name),
    ("POST", "tag"): ("_tag", _name),
    ("DELETE", "tag"): ("_tag", _name),
    ("POST", "discussions"): ("_create_discussion", _only(1)),
    ("GET", "discussions"): ("_discussion", _discussion_number),
    ("PUT", "settings"): ("_settings", _only(1)),
}

#: ``/{repo}/{action}/...`` -> (handler method, arguments after repo_type, repo_id)
WEB_ROUTES: dict[tuple[str, str], tuple[str, Args]] = {
    ("GET", "resolve"): ("_resolve", lambda rest: _revision_and_path(rest) if len(rest) >= 3 else None),
    ("HEAD", "resolve"): ("_resolve", lambda rest: _revision_and_path(rest) if len(rest) >= 3 else None),
}

#: ``/{repo}.git/info/lfs/objects/{action}/...`` -> (handler method, arguments after repo_type, repo_id)
LFS_ROUTES: dict[tuple[str, str], tuple[str, Args]] = {
    ("POST", "batch"): ("_lfs_batch", _only(1)),
    ("PUT", "upload"): ("_lfs_upload", lambda rest: (rest[1], rest[2]) if len(rest) == 3 else None),
    ("GET", "download"): ("_lfs_download", lambda rest: (rest[1],) if len(rest) == 2 else None),
    ("HEAD", "download"): ("_lfs_download", lambda rest: (rest[1],) if len(rest) == 2 else None),
}


def route(handler: BaseHandler, method: str, path: str) -> None:
    """Call the handler method that ``method`` and ``path`` name; ``NotFound`` if none does."""
    segs = path.split("/")[1:]
    if segs and segs[-1] == "" and len(segs) > 1:
        segs = segs[:-1]
    if segs and segs[0] == "api":
        _route_api(handler, method, segs[1:])
    else:
        _route_web(handler, method, segs)


def _unknown(handler: BaseHandler, method: str) -> NotFound:
    return NotFound(f"The local Hub does not implement {method} {urlsplit(handler.path).path}.")


def _call(
    handler: BaseHandler, table: dict[tuple[str, str], tuple[str, Args]], method: str, action: str, rest: list[str],
    repo_type: str, repo_id: str,
) -> None:  # fmt: skip
    entry = table.get((method, action))
    args = entry[1](rest) if entry is not None else None
    if entry is None or args is None:
        raise _unknown(handler, method)
    getattr(handler, entry[0])(repo_type, repo_id, *args)


def _route_api(handler: BaseHandler, method: str, segs: list[str]) -> None:
    name = API_ROUTES.get((method, tuple(segs)))
    if name is not None:
        return getattr(handler, name)()
    if not segs or segs[0] not in TYPE_SEGMENTS:
        raise _unknown(handler, method)
    repo_type = TYPE_SEGMENTS[segs[0]]
    if len(segs) == 1 and method == "GET":
        return getattr(handler, LIST_ROUTE)(repo_type)
    if len(segs) < 3:
        raise _unknown(handler, method)
    repo_id = f"{unquote(segs[1])}/{unquote(segs[2])}"
    rest = segs[3:]
    action = rest[0] if rest else ""
    if action.startswith("xet-"):
        logger.warning(
            "a client asked for a xet token (%s %s): the local Hub has no xet; clients uploading LFS files "
            "must set HF_HUB_DISABLE_XET=1",
            method,
            urlsplit(handler.path).path,
        )
        raise NotImplementedOnLocalHub(
            "The local Hub does not speak the xet protocol. Set HF_HUB_DISABLE_XET=1 in the client, or start "
            "the server without --lfs-extensions so that every file is uploaded as a regular file."
        )
    _call(handler, REPO_ROUTES, method, action, rest, repo_type, repo_id)


def _route_web(handler: BaseHandler, method: str, segs: list[str]) -> None:
    repo_type = "model"
    if segs and segs[0] in URL_TYPE_PREFIXES:
        repo_type = URL_TYPE_PREFIXES[segs[0]]
        segs = segs[1:]
    if len(segs) < 3:
        raise _unknown(handler, method)
    namespace, name, rest = unquote(segs[0]), unquote(segs[1]), segs[2:]
    if name.endswith(".git") and rest[:3] == ["info", "lfs", "objects"]:
        rest = rest[3:]
        action = rest[0] if rest else ""
        return _call(handler, LFS_ROUTES, method, action, rest, repo_type, f"{namespace}/{name[:-4]}")
    _call(handler, WEB_ROUTES, method, rest[0], rest, repo_type, f"{namespace}/{name}")
