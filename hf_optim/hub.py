"""Optimizer state on the Hugging Face Hub: push in one commit, download into the HF cache, ``hf://`` URLs.

Every Hub call goes through ``huggingface_hub`` (``HfApi.create_repo`` / ``create_branch`` / ``create_commit``,
``snapshot_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, the cache layout and the progress
bars behave as everywhere else in the ecosystem. :func:`load_state` fetches only the state files (optimizer,
index, shards, scheduler, accumulator) of the requested subfolder; :func:`download_checkpoint` fetches a whole
checkpoint folder, for resuming a Trainer or Accelerate run.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    parse_hf_uri,
    snapshot_download,
)
from huggingface_hub.errors import HfUriError, LocalEntryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_optim.serialization import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    save_state,
)

logger = logging.getLogger(__name__)

__all__ = ["HfUrl", "download_checkpoint", "parse_hf_url", "push_state_to_hub", "resolve_state_dir"]

# huggingface_hub's split_state_dict_into_shards_factory names shards with the suffix -{i:05d}-of-{n:05d}
_SHARD_GLOB = OPTIMIZER_SHARD_PATTERN.format(suffix="-?????-of-?????")
_STATE_FILES = (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME, SCHEDULER_NAME, ACCUMULATOR_NAME)
_REPO_TYPES = ("model", "dataset", "space")
_EXTRA_OPTIMIZER_DIRS = "optimizer_[0-9]*/*"  # further optimizers of an Accelerate checkpoint


@dataclass(frozen=True)
class HfUrl:
    """A parsed ``hf://[TYPE/]NAMESPACE/NAME[@REVISION][/SUBFOLDER]`` URL."""

    repo_type: str  #: "model", "dataset" or "space"
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


def parse_hf_url(url: str) -> HfUrl:
    """Parse an ``hf://`` URL (or a huggingface.co web URL) with ``huggingface_hub.parse_hf_uri``, offline.

    ``hf://USER/REPO[@REVISION]/SUBFOLDER``; ``hf://datasets/USER/REPO/...`` and ``hf://spaces/...`` name other
    repo types; a revision containing ``/`` is percent-encoded (``@refs%2Fpr%2F1``) except ``refs/pr/N``.
    """
    try:
        parsed = parse_hf_uri(url)
    except HfUriError as err:
        raise ValueError(f"invalid hf:// URL {url!r}: {err}") from None
    if parsed.type not in _REPO_TYPES:
        raise ValueError(
            f"hf:// URL {url!r} points to a {parsed.type}; optimizer state lives in a model, dataset or "
            "space repository"
        )
    return HfUrl(parsed.type, parsed.id, parsed.revision, parsed.path_in_repo.strip("/") or None)


def _clean_subfolder(subfolder: str | None) -> str | None:
    if subfolder is None:
        return None
    if not isinstance(subfolder, str):
        raise ValueError(f"subfolder must be a string, got {type(subfolder).__name__}")
    cleaned = subfolder.replace("\\", "/").strip("/")
    if not cleaned:
        return None
    parts = cleaned.split("/")
    if any(part in ("", ".", "..") for part in parts) or os.path.isabs(subfolder):
        raise ValueError(f"subfolder must be a relative path inside the repository, got {subfolder!r}")
    return cleaned


def _merge(name: str, explicit: str | None, from_url: str | None, url: str) -> str | None:
    if explicit is not None and from_url is not None and explicit != from_url:
        raise ValueError(f"{name}={explicit!r} conflicts with {from_url!r} in {url!r}")
    return explicit if explicit is not None else from_url


def _is_url(value: str) -> bool:
    return value.startswith(("hf://", "https://", "http://"))


def _state_patterns(subfolder: str | None) -> list[str]:
    prefix = f"{subfolder}/" if subfolder else ""
    return [prefix + name for name in (*_STATE_FILES, _SHARD_GLOB)]


def _repo_location(
    repo_id_or_url: str, subfolder: str | None, revision: str | None, repo_type: str | None
) -> tuple[str, str | None, str | None, str | None]:
    """``(repo_id, subfolder, revision, repo_type)`` from a repo id or an ``hf://`` URL plus explicit arguments."""
    repo_id = repo_id_or_url
    if _is_url(repo_id_or_url):
        url = parse_hf_url(repo_id_or_url)
        repo_id = url.repo_id
        revision = _merge("revision", revision, url.revision, repo_id_or_url)
        subfolder = _merge("subfolder", _clean_subfolder(subfolder), url.subfolder, repo_id_or_url)
        repo_type = _merge("repo_type", repo_type, url.repo_type, repo_id_or_url)
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ValueError(f"{repo_id!r} is not a valid Hub repo id: {err}") from None
    return repo_id, _clean_subfolder(subfolder), revision, repo_type


def _snapshot_folder(
    repo_id: str,
    subfolder: str | None,
    revision: str | None,
    repo_type: str | None,
    token: str | bool | None,
    allow_patterns: list[str],
    what: str,
    ignore_patterns: list[str] | None = None,
) -> str:
    where = f", subfolder {subfolder!r}" if subfolder else ""
    try:
        snapshot = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            token=token,
        )
    except LocalEntryNotFoundError as err:
        raise LocalEntryNotFoundError(
            f"the {what} of {repo_id} (revision {revision or 'main'}{where}) is not in the local cache "
            f"and cannot be downloaded: {err}"
        ) from err
    return os.path.join(snapshot, *subfolder.split("/")) if subfolder else snapshot


def download_checkpoint(
    repo_id_or_url: str,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    repo_type: str | None = None,
) -> str:
    """Download a whole checkpoint folder from the Hub into the HF cache and return the local folder.

    ``repo_id_or_url`` is ``"user/repo"`` or ``"hf://[datasets/]user/repo[@revision][/subfolder]"``. Everything
    below ``subfolder`` is fetched (model weights, RNG and trainer state, optimizer state), so a plain
    ``transformers.Trainer`` can ``train(resume_from_checkpoint=...)`` from the result. At the repository root,
    its files and ``optimizer_N/`` folders are fetched, not other folders such as a run's ``checkpoint-*``.
    With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cached copy is used.
    """
    repo_id, subfolder, revision, repo_type = _repo_location(repo_id_or_url, subfolder, revision, repo_type)
    if subfolder:
        # fnmatch's "*" crosses "/": the whole folder
        directory = _snapshot_folder(
            repo_id, subfolder, revision, repo_type, token, [f"{subfolder}/*"], "checkpoint"
        )
    else:
        # Patterns only, no listing of the root: snapshot_download checks a cached snapshot against exactly these
        # patterns, so the cache serves them offline too. The root's files ("*/*": not those in folders) ...
        directory = _snapshot_folder(
            repo_id, None, revision, repo_type, token, ["*"], "checkpoint", ignore_patterns=["*/*"]
        )
        # ... then its optimizer_N/ folders, from the same commit (the snapshot folder's name)
        commit = os.path.basename(directory)
        _snapshot_folder(repo_id, None, commit, repo_type, token, [_EXTRA_OPTIMIZER_DIRS], "checkpoint")
    if not os.path.isdir(directory) or not os.listdir(directory):
        where = f"folder {subfolder!r}" if subfolder else "files at the repository root"
        raise FileNotFoundError(f"{repo_id} (revision {revision or 'main'}) has no {where}")
    return directory


def _download_state(
    repo_id_or_url: str, subfolder: str | None, revision: str | None, token: str | bool | None
) -> str:
    """Download only the optimizer-state files (optimizer, index, shards, scheduler, accumulator)."""
    repo_id, subfolder, revision, repo_type = _repo_location(repo_id_or_url, subfolder, revision, None)
    directory = _snapshot_folder(
        repo_id, subfolder, revision, repo_type, token, _state_patterns(subfolder), "optimizer state"
    )
    if not any(os.path.isfile(os.path.join(directory, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME)):
        where = f"subfolder {subfolder!r}" if subfolder else "the repository root"
        raise FileNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) has no optimizer state in {where}: expected "
            f"{OPTIMIZER_NAME} or {OPTIMIZER_INDEX_NAME}"
        )
    return directory


def resolve_state_dir(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> str:
    """A local directory holding the state: local paths as they are, Hub repo ids / ``hf://`` URLs downloaded."""
    value = os.fspath(path_or_repo_id)
    if not isinstance(value, str):
        raise ValueError(f"path_or_repo_id must be a path, repo id or hf:// URL, got {path_or_repo_id!r}")
    if _is_url(value):
        return _download_state(value, subfolder, revision, token)
    if os.path.isdir(value):
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hub repositories, but {value!r} is a local directory"
            )
        sub = _clean_subfolder(subfolder)
        directory = os.path.join(value, *sub.split("/")) if sub else value
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no subfolder {sub!r} in {value}")
        return directory
    if os.path.exists(value):
        raise ValueError(f"{value!r} is a file; pass the checkpoint directory")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise FileNotFoundError(f"{value!r} is neither a local directory nor a Hub repo id") from None
    return _download_state(value, subfolder, revision, token)


def push_state_to_hub(
    repo_id: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    repo_type: str | None = None,
) -> CommitInfo:
    """Save the state (see :func:`hf_optim.save_state`) and upload it to ``repo_id`` in one commit.

    Creates the repo if needed (``private`` applies then) and the branch ``revision`` if it does not exist. State
    files of a previous push in the same subfolder that the new checkpoint does not use (e.g. surplus shards)
    are deleted in the same commit. ``create_pr=True`` opens a pull request against ``revision`` instead.
    """
    repo_id, subfolder, revision, repo_type = _repo_location(repo_id, subfolder, revision, repo_type)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    prefix = f"{subfolder}/" if subfolder else ""
    with tempfile.TemporaryDirectory(prefix="hf_optim-push-") as tmp:
        written = save_state(tmp, optimizer, scheduler, accumulator, max_shard_size=max_shard_size)
        names = [os.path.basename(path) for path in written]
        existing = api.list_repo_files(repo_id, revision=revision, repo_type=repo_type)
        stale = []
        for path in existing:
            folder, name = posixpath.split(path)
            if (
                folder == (subfolder or "")
                and name not in names
                and (name in _STATE_FILES or fnmatch.fnmatchcase(name, _SHARD_GLOB))
            ):
                stale.append(path)
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=path)
            for name, path in zip(names, written, strict=True)
        ]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload optimizer state with hf_optim",
            revision=revision,
            repo_type=repo_type,
            create_pr=create_pr,
        )
    logger.info("pushed optimizer state to %s (%s)", repo_id, info.commit_url)
    return info
