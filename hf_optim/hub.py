"""Optimizer state on the Hugging Face Hub: push in one commit, download into the HF cache, ``hf://`` URLs.

Every Hub call goes through ``huggingface_hub`` (``HfApi.create_repo`` / ``create_branch`` / ``upload_folder``,
``hf_hub_download``, ``snapshot_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, the cache
layout and the progress bars behave as everywhere else in the ecosystem. :func:`load_state` downloads the
manifest (``optimizer.safetensors`` or the index) first and then exactly the files it references, like
transformers does for sharded weights; :func:`download_checkpoint` fetches a whole checkpoint folder, for
resuming a Trainer or Accelerate run. :func:`load_state` and :func:`inspect_state` are ``hf_optim.state``'s
with Hub repo ids and ``hf://`` URLs added.

Every entry point takes the same Hub keywords: ``repo_type``, ``revision``, ``subfolder``, ``token``,
``cache_dir``, ``local_files_only``, ``force_download``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from huggingface_hub import (
    CommitInfo,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    parse_hf_uri,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HfUriError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_optim import state
from hf_optim._utils import clean_subfolder, is_hub_url
from hf_optim.errors import CheckpointError
from hf_optim.state import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    LoadReport,
    ShardedStateInfo,
    StateInfo,
    save_state,
    sharded,
    zero,
)
from hf_optim.state.io import checkpoint_roots
from hf_optim.state.reader import manifest_files
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = [
    "HfUrl",
    "download_checkpoint",
    "inspect_state",
    "load_state",
    "parse_hf_url",
    "push_state_to_hub",
    "resolve_state_dir",
]

# huggingface_hub's split_state_dict_into_shards_factory names shards with the suffix -{i:05d}-of-{n:05d}
_SHARD_GLOB = OPTIMIZER_SHARD_PATTERN.format(suffix="-?????-of-?????")
_STATE_FILES = (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME, SCHEDULER_NAME, ACCUMULATOR_NAME)
_REPO_TYPES = ("model", "dataset", "space")
_EXTRA_OPTIMIZER_DIRS = "optimizer_[0-9]*/*"  # further optimizers of an Accelerate checkpoint
_GLOB_CHARACTERS = frozenset("*?[]")


@dataclass(frozen=True)
class HfUrl:
    """A parsed ``hf://[TYPE/]NAMESPACE/NAME[@REVISION][/SUBFOLDER]`` URL."""

    repo_type: str  #: "model", "dataset" or "space"
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


@dataclass(frozen=True)
class HubOptions:
    """How files are downloaded from the Hub (passed as they are to ``huggingface_hub``)."""

    token: str | bool | None = None
    cache_dir: str | os.PathLike[str] | None = None
    local_files_only: bool = False
    force_download: bool = False

    def only_cached(self, cache_only: bool = True) -> HubOptions:
        """The same options, downloading nothing when ``cache_only``."""
        return replace(self, local_files_only=self.local_files_only or cache_only)


@dataclass(frozen=True)
class _Location:
    repo_id: str
    subfolder: str | None
    revision: str | None
    repo_type: str | None

    def describe(self) -> str:
        where = f", subfolder {self.subfolder!r}" if self.subfolder else ""
        return f"{self.repo_id} (revision {self.revision or 'main'}{where})"


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
    """:func:`~hf_optim._utils.clean_subfolder`, without glob characters (it becomes a download pattern)."""
    cleaned = clean_subfolder(subfolder)
    if cleaned and _GLOB_CHARACTERS & set(cleaned):
        raise ValueError(f"subfolder must not contain glob characters (* ? [ ]), got {subfolder!r}")
    return cleaned


def _merge(name: str, explicit: str | None, from_url: str | None, url: str) -> str | None:
    if explicit is not None and from_url is not None and explicit != from_url:
        raise ValueError(f"{name}={explicit!r} conflicts with {from_url!r} in {url!r}")
    return explicit if explicit is not None else from_url


def _locate(
    repo_id_or_url: str, subfolder: str | None, revision: str | None, repo_type: str | None
) -> _Location:
    """Repo id, subfolder, revision and type from a repo id or an ``hf://`` URL plus explicit arguments."""
    repo_id = repo_id_or_url
    if is_hub_url(repo_id_or_url):
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
    if repo_type is not None and repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type must be one of {_REPO_TYPES}, got {repo_type!r}")
    return _Location(repo_id, _clean_subfolder(subfolder), revision, repo_type)


def _not_cached(
    what: str, location: _Location, err: Exception, local_files_only: bool
) -> LocalEntryNotFoundError:
    """One clear error for a download that neither the Hub nor the cache could serve."""
    if local_files_only or constants.HF_HUB_OFFLINE:
        why = "offline mode (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        reason = f"and {why} forbids downloading it"
    else:
        reason = (
            f"and the Hub at {constants.ENDPOINT} could not be reached. Offline alternatives: HF_HUB_OFFLINE=1 "
            "loads what is already cached; `hf-optim hub serve` runs a local Hub (point HF_ENDPOINT at it)"
        )
    return LocalEntryNotFoundError(
        f"the {what} of {location.describe()} is not in the local cache {reason} ({type(err).__name__})"
    )


def _snapshot_folder(
    location: _Location,
    allow_patterns: list[str],
    what: str,
    options: HubOptions,
    *,
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> str:
    try:
        snapshot = snapshot_download(
            location.repo_id,
            repo_type=location.repo_type,
            revision=revision or location.revision,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=options.local_files_only,
            force_download=options.force_download,
        )
    except LocalEntryNotFoundError as err:
        raise _not_cached(what, location, err, options.local_files_only) from err
    return os.path.join(snapshot, *location.subfolder.split("/")) if location.subfolder else snapshot


def download_checkpoint(
    repo_id_or_url: str,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    repo_type: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Download a whole checkpoint folder from the Hub into the HF cache and return the local folder.

    ``repo_id_or_url`` is ``"user/repo"`` or ``"hf://[datasets/]user/repo[@revision][/subfolder]"``. Everything
    below ``subfolder`` is fetched (model weights, RNG and trainer state, optimizer state), so a plain
    ``transformers.Trainer`` can ``train(resume_from_checkpoint=...)`` from the result. At the repository root,
    its files and ``optimizer_N/`` folders are fetched, not other folders such as a run's ``checkpoint-*``.
    With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cached copy is used.
    """
    location = _locate(repo_id_or_url, subfolder, revision, repo_type)
    options = HubOptions(token, cache_dir, local_files_only, force_download)
    if location.subfolder:
        # fnmatch's "*" crosses "/": the whole folder (glob characters in the subfolder are refused)
        directory = _snapshot_folder(location, [f"{location.subfolder}/*"], "checkpoint", options)
    else:
        # Patterns only, no listing of the root: snapshot_download checks a cached snapshot against exactly these
        # patterns, so the cache serves them offline too. The root's files ("*/*": not those in folders) ...
        directory = _snapshot_folder(location, ["*"], "checkpoint", options, ignore_patterns=["*/*"])
        # ... then its optimizer_N/ folders, from the same commit (the snapshot folder's name)
        commit = os.path.basename(directory)
        _snapshot_folder(location, [_EXTRA_OPTIMIZER_DIRS], "checkpoint", options, revision=commit)
    if not os.path.isdir(directory) or not os.listdir(directory):
        where = f"folder {location.subfolder!r}" if location.subfolder else "files at the repository root"
        raise FileNotFoundError(f"{location.repo_id} (revision {location.revision or 'main'}) has no {where}")
    return directory


def _fetcher(location: _Location, options: HubOptions) -> Callable[..., str]:
    def fetch(name: str, revision: str | None, *, cache_only: bool = False) -> str:
        return hf_hub_download(
            location.repo_id,
            name,
            subfolder=location.subfolder,
            repo_type=location.repo_type,
            revision=revision,
            token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=options.local_files_only or cache_only,
            force_download=options.force_download,
        )

    return fetch


def _fetch_manifest(
    location: _Location, fetch: Callable[..., str], local_files_only: bool, *, prefer_sharded: bool
) -> str:
    """Download the state's manifest; returns its local path.

    A folder may hold both an ordinary and a sharded checkpoint (``consolidate_to``): the sharded one is taken
    first for a sharded optimizer (``prefer_sharded``), last otherwise.
    """
    # The index takes precedence (as locally). If it cannot be had from the Hub nor the cache (offline, or the Hub
    # unreachable), the single-file manifest may still be cached: look there only, without a second round of
    # connection retries.
    unreachable: LocalEntryNotFoundError | None = None
    names = (OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME)
    names = (SHARDED_MANIFEST_NAME, *names) if prefer_sharded else (*names, SHARDED_MANIFEST_NAME)
    for name in names:
        try:
            return fetch(name, location.revision, cache_only=unreachable is not None)
        except LocalEntryNotFoundError as err:
            unreachable = unreachable or err
        except EntryNotFoundError:
            continue
        except RevisionNotFoundError:
            raise CheckpointError(
                f"{location.describe()}: the repository has no revision {location.revision!r}"
            ) from None
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{location.describe()}: no such repository on the Hub (or it is private and no token with access "
                "was given)"
            ) from None
    if unreachable is not None:
        raise _not_cached("optimizer state", location, unreachable, local_files_only) from unreachable
    where = f"subfolder {location.subfolder!r}" if location.subfolder else "the repository root"
    raise FileNotFoundError(
        f"{location.repo_id} (revision {location.revision or 'main'}) has no optimizer state in {where}: "
        f"expected {OPTIMIZER_NAME} or {OPTIMIZER_INDEX_NAME}"
    )


def _referenced(manifest_path: str) -> list[str]:
    """Every file the manifest references (relative paths, itself first)."""
    if os.path.basename(manifest_path) == SHARDED_MANIFEST_NAME:
        return zero.manifest_files(manifest_path)
    return manifest_files(manifest_path)


def _commit_of(location: _Location, manifest_path: str) -> str:
    """The commit a downloaded file belongs to: its cache snapshot folder's name."""
    snapshot = os.path.dirname(manifest_path)
    for _ in location.subfolder.split("/") if location.subfolder else ():
        snapshot = os.path.dirname(snapshot)
    return os.path.basename(snapshot)


def _fetch_files(
    location: _Location,
    fetch: Callable[..., str],
    manifest_path: str,
    names: list[str],
    local_files_only: bool,
) -> None:
    """Download ``names`` (relative to the manifest's folder) from the manifest's commit."""
    commit = _commit_of(location, manifest_path)  # every further file from the manifest's commit
    try:
        for name in names:
            if name != os.path.basename(manifest_path):
                fetch(name, commit)
    except LocalEntryNotFoundError as err:
        raise _not_cached("optimizer state", location, err, local_files_only) from err
    except EntryNotFoundError as err:
        raise CheckpointError(
            f"{manifest_path} references a file the repository does not have: {err}"
        ) from None


def _download_state(location: _Location, options: HubOptions) -> str:
    """Download the manifest, then the files it references; returns the local folder."""
    fetch = _fetcher(location, options)
    manifest_path = _fetch_manifest(location, fetch, options.local_files_only, prefer_sharded=False)
    _fetch_files(location, fetch, manifest_path, _referenced(manifest_path), options.local_files_only)
    return os.path.dirname(manifest_path)


def _cache_if_unreachable(location: _Location, options: HubOptions) -> HubOptions:
    """``options`` limited to the cache when the Hub cannot be reached and the cache holds a manifest of
    ``location``'s revision.

    ``hf_hub_download`` retries a file it has no cached copy of for about half a minute before giving up; a
    checkpoint whose single-file manifest is cached would pay that for the index it tries first. One request
    without retries tells whether the Hub answers: an HTTP response (even an error) means it does, and the
    downloads run as usual. Nothing cached: the downloads run as usual too, with their retries.
    """
    if options.local_files_only or options.force_download or constants.HF_HUB_OFFLINE:
        return options
    names = (SHARDED_MANIFEST_NAME, OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME)
    path = location.subfolder + "/" if location.subfolder else ""
    cached = [
        name
        for name in names
        if isinstance(
            try_to_load_from_cache(
                location.repo_id,
                path + name,
                cache_dir=options.cache_dir,
                revision=location.revision,
                repo_type=location.repo_type,
            ),
            str,
        )
    ]
    if not cached:
        return options
    url = hf_hub_url(
        location.repo_id,
        cached[0],
        subfolder=location.subfolder,
        repo_type=location.repo_type,
        revision=location.revision,
    )
    try:
        get_hf_file_metadata(url, token=options.token)
    except HfHubHTTPError:
        return options  # the Hub answered
    except Exception as err:  # no HTTP response: connection refused, timeout, name resolution, ...
        logger.warning(
            "the Hub at %s could not be reached (%s): loading %s from the local cache",
            constants.ENDPOINT,
            type(err).__name__,
            location.describe(),
        )
        return options.only_cached()
    return options


def _once_per_machine(work: Callable[[bool], _T]) -> _T:
    """``work(cache_only)`` on every process: local rank 0 first (downloading), then the others (from the cache
    it filled, ``cache_only=True``); all processes raise together if any failed. A collective."""
    first = sharded.local_rank() == 0
    if not first:
        sharded.barrier()
    error = result = None
    try:
        result = work(not first)
    except Exception as err:
        error = err
    if first:
        sharded.barrier()
    message = sharded.agree(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"downloading the optimizer state failed on another process: {message}")
    return result


def _download_sharded(location: _Location, model: torch.nn.Module, opt: Any, options: HubOptions) -> str:
    """The state for a sharded (FSDP2) optimizer, downloaded once per machine: the manifest, then only the shard
    files this machine's processes read (every file of an ordinary checkpoint). A collective."""
    local_only = options.local_files_only

    def manifest(where: _Location) -> Callable[[bool], str]:
        def fetch_manifest(cache_only: bool) -> str:
            fetch = _fetcher(where, options.only_cached(cache_only))
            return _fetch_manifest(where, fetch, local_only, prefer_sharded=True)

        return fetch_manifest

    manifest_path = _once_per_machine(manifest(location))
    # Machines resolve the revision one after the other: if it moved in between, all take rank 0's commit. They
    # must also have found the same kind of manifest (offline, a cache may hold another one): else all raise.
    mine = f"{_commit_of(location, manifest_path)}/{os.path.basename(manifest_path)}"
    chosen = sharded.broadcast_text(mine)
    if sharded.agree(None if mine == chosen else "the revision moved") is not None:
        pinned = replace(location, revision=chosen.split("/")[0])
        manifest_path = _once_per_machine(manifest(pinned))
        mine = f"{_commit_of(location, manifest_path)}/{os.path.basename(manifest_path)}"
        error = sharded.agree(None if mine == chosen else f"this machine found {mine}, rank 0 found {chosen}")
        if error is not None:
            raise CheckpointError(f"the machines found different optimizer state on the Hub: {error}")
    if os.path.basename(manifest_path) == SHARDED_MANIFEST_NAME:
        names = zero.machine_files(manifest_path, opt, model)
    else:
        names = manifest_files(manifest_path)

    def files(cache_only: bool) -> None:
        if not cache_only:
            _fetch_files(location, _fetcher(location, options), manifest_path, names, local_only)

    _once_per_machine(files)
    return os.path.dirname(manifest_path)


def _resolve(
    path_or_repo_id: str | os.PathLike[str],
    *,
    repo_type: str | None,
    revision: str | None,
    subfolder: str | None,
    options: HubOptions,
    sharded_optimizer: bool = False,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
) -> tuple[str, list[str]]:
    value = os.fspath(path_or_repo_id)
    if not isinstance(value, str):
        raise TypeError(f"path_or_repo_id must be a path, repo id or hf:// URL, got {path_or_repo_id!r}")
    if not is_hub_url(value) and os.path.isdir(value):
        if revision is not None or repo_type is not None:
            raise ValueError(
                f"revision / repo_type apply to Hub repositories, but {value!r} is a local directory"
            )
        sub = clean_subfolder(subfolder)
        directory = os.path.join(value, *sub.split("/")) if sub else value
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no subfolder {subfolder!r} in {value}")
        return directory, checkpoint_roots(directory)
    if not is_hub_url(value):
        if os.path.exists(value):
            raise ValueError(f"{value!r} is a file; pass the checkpoint directory")
        try:
            validate_repo_id(value)
        except HFValidationError:
            raise FileNotFoundError(f"{value!r} is neither a local directory nor a Hub repo id") from None
    location = _locate(value, subfolder, revision, repo_type)
    options = _cache_if_unreachable(location, options)
    if model is not None and sharded_optimizer:
        directory = _download_sharded(location, model, optimizer, options)
    else:
        directory = _download_state(location, options)
    return directory, checkpoint_roots(directory)


def resolve_state_dir(
    path_or_repo_id: str | os.PathLike[str],
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """A local directory holding the state: local paths as they are, Hub repo ids / ``hf://`` URLs downloaded
    (the manifest, then only the files it references)."""
    directory, _roots = _resolve(
        path_or_repo_id,
        repo_type=repo_type,
        revision=revision,
        subfolder=subfolder,
        options=HubOptions(token, cache_dir, local_files_only, force_download),
    )
    return directory


def load_state(
    path_or_repo_id: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    strict: bool = True,
    repo_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    model: torch.nn.Module | None = None,
) -> LoadReport:
    """:func:`hf_optim.state.load_state` from a local directory, a Hub repo id or an ``hf://`` URL.

    Hub repositories are downloaded with ``huggingface_hub`` into the usual cache (``HF_HUB_OFFLINE=1`` works):
    the manifest first, then only the files it references. Everything is validated before the optimizer,
    scheduler or accumulator is touched; on any error they are left exactly as they were. ``model``: see
    :func:`hf_optim.state.load_state` (required for sharded FSDP2 state; then each machine downloads once).
    """
    is_sharded = sharded.is_sharded(optimizer) or zero.find_zero(optimizer, model) is not None
    if zero.find_zero(optimizer, model) is not None and model is None:
        raise ValueError("the optimizer is DeepSpeed ZeRO's: pass model= (the engine) to name its parameters")
    sharded.require_model(optimizer, model)
    directory, roots = _resolve(
        path_or_repo_id,
        repo_type=repo_type,
        revision=revision,
        subfolder=subfolder,
        options=HubOptions(token, cache_dir, local_files_only, force_download),
        sharded_optimizer=is_sharded,
        model=model,
        optimizer=optimizer,
    )
    return state.load_state(
        directory, optimizer, scheduler, accumulator, strict=strict, roots=roots, model=model
    )


def inspect_state(
    path_or_repo_id: str | os.PathLike[str],
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> StateInfo | ShardedStateInfo:
    """:func:`hf_optim.state.inspect_state` for a local directory, a Hub repo id or an ``hf://`` URL (a sharded
    checkpoint is described by :func:`hf_optim.state.inspect_sharded_state`)."""
    directory, roots = _resolve(
        path_or_repo_id,
        repo_type=repo_type,
        revision=revision,
        subfolder=subfolder,
        options=HubOptions(token, cache_dir, local_files_only, force_download),
    )
    if state.has_sharded_state(directory) and not state.has_state(directory):
        return state.inspect_sharded_state(directory)
    return state.inspect_state(directory, roots=roots)


def push_state_to_hub(
    repo_id: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    model: torch.nn.Module | None = None,
    save_directory: str | os.PathLike[str] | None = None,
) -> CommitInfo | None:
    """Save the state (see :func:`hf_optim.save_state`) and upload it to ``repo_id`` in one commit.

    Creates the repo if needed (``private`` applies then) and the branch ``revision`` if it does not exist. State
    files of a previous push in the same subfolder that the new checkpoint does not use (e.g. surplus shards)
    are deleted in the same commit. ``create_pr=True`` opens a pull request against ``revision`` instead.

    Sharded (FSDP2) state: call it on every process with ``model=``. Every process writes its shard, then rank 0
    makes the one commit and returns its ``CommitInfo`` (the others return None). The files go to a temporary
    folder on this machine, or to ``save_directory``, which must be on a filesystem every machine sees when the
    processes span several machines.
    """
    location = _locate(repo_id, subfolder, revision, repo_type)
    upload = {"location": location, "token": token, "commit_message": commit_message}
    upload.update(private=private, create_pr=create_pr)
    if sharded.is_sharded(optimizer) or zero.find_zero(optimizer, model) is not None:
        return _push_sharded(optimizer, scheduler, accumulator, model, save_directory, max_shard_size, upload)
    if save_directory is not None:
        save_state(
            save_directory, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size
        )
        return _upload(os.fspath(save_directory), **upload)
    with tempfile.TemporaryDirectory(prefix="hf_optim-push-") as tmp:
        save_state(tmp, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size)
        return _upload(tmp, **upload)


def _upload(
    folder: str,
    *,
    location: _Location,
    token: str | bool | None,
    commit_message: str | None,
    private: bool | None,
    create_pr: bool,
) -> CommitInfo:
    """One commit of a saved state folder; state files of an earlier push that it does not use are deleted."""
    api = HfApi(token=token)
    repo = api.create_repo(
        location.repo_id, private=private, repo_type=location.repo_type, exist_ok=True
    ).repo_id
    if location.revision is not None and not create_pr and not location.revision.startswith("refs/"):
        api.create_branch(repo, branch=location.revision, repo_type=location.repo_type, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        path_in_repo=location.subfolder,
        commit_message=commit_message or "Upload optimizer state with hf_optim",
        revision=location.revision,
        repo_type=location.repo_type,
        create_pr=create_pr,
        # state files of an earlier push that this checkpoint does not use (upload_folder keeps the new ones)
        delete_patterns=[*_STATE_FILES, _SHARD_GLOB, SHARDED_MANIFEST_NAME, "optimizer-shards-*/*"],
        ignore_patterns=[".*", "*/.*"],  # lock, staging folders
    )
    logger.info("pushed optimizer state to %s (%s)", repo, info.commit_url)
    return info


def _push_sharded(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accumulator: Any,
    model: torch.nn.Module | None,
    save_directory: str | os.PathLike[str] | None,
    max_shard_size: int | str | None,
    upload: dict[str, Any],
) -> CommitInfo | None:
    sharded.require_model(optimizer, model)
    spans_machines = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) != os.environ.get(
        "WORLD_SIZE"
    )
    if save_directory is None and spans_machines:
        raise ValueError(
            "the processes span several machines: pass save_directory= on a filesystem all of them see"
        )
    temporary = save_directory is None
    folder = os.fspath(save_directory) if save_directory is not None else None
    if temporary:
        folder = sharded.broadcast_text(
            tempfile.mkdtemp(prefix="hf_optim-push-") if sharded.rank() == 0 else ""
        )
    try:
        save_state(folder, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size)
        info = error = None
        if sharded.rank() == 0:
            try:
                info = _upload(folder, **upload)
            except Exception as err:  # reported on every process below
                error = err
        message = sharded.agree(None if error is None else f"{type(error).__name__}: {error}")
    finally:
        sharded.barrier()
        if temporary and sharded.rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if error is not None:
        raise error
    if message is not None:
        raise OSError(f"pushing the sharded optimizer state failed on rank 0: {message}")
    return info
