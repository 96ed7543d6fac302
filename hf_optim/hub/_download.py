"""Downloads from the Hub into the HF cache: a whole checkpoint folder, or an optimizer state's manifest and then
exactly the files it references (once per machine for sharded state)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_optim.errors import CheckpointError
from hf_optim.hub._options import HubOptions
from hf_optim.hub._url import Location, locate
from hf_optim.state import OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME, sharded, zero
from hf_optim.state.reader import manifest_files
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME

__all__ = ["cache_if_unreachable", "download_checkpoint", "download_sharded", "download_state"]

logger = logging.getLogger("hf_optim.hub")

_T = TypeVar("_T")
_EXTRA_OPTIMIZER_DIRS = "optimizer_[0-9]*/*"  # further optimizers of an Accelerate checkpoint


def _not_cached(
    what: str, location: Location, err: Exception, local_files_only: bool
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
    location: Location,
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
            cache_dir=options.cache_path,
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

    Args:
        repo_id_or_url: ``"user/repo"`` or an ``hf://`` URL (which may carry the revision and subfolder).
        subfolder: The checkpoint folder inside the repository (``"checkpoint-500"``); ``None``: the root.
        revision: A branch, tag or commit; ``None``: the default branch.
        token: A Hub token; ``None``: the one ``huggingface_hub`` finds (``HF_TOKEN``, the login).
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        cache_dir: The Hugging Face cache folder; ``None``: the usual one.
        local_files_only: Use the cache only, never download.
        force_download: Download again even if cached.

    Returns:
        The local folder (in the HF cache) holding the checkpoint.

    Raises:
        ValueError: If the repo id or URL is invalid, or an explicit argument conflicts with the URL.
        FileNotFoundError: If the repository has no such folder (or no files at its root).
        huggingface_hub.errors.LocalEntryNotFoundError: If the files are not cached and cannot be downloaded
            (offline, or the Hub unreachable).
        huggingface_hub.errors.RepositoryNotFoundError: If there is no such repository (or no access to it).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 2)
        optimizer = hf_optim.AdamW(model.parameters())
        hf_optim.push_state_to_hub("me/docs-download", optimizer, subfolder="checkpoint-10", model=model)
        folder = hf_optim.download_checkpoint("hf://me/docs-download/checkpoint-10")
        assert hf_optim.has_state(folder)
        ```
    """
    location = locate(repo_id_or_url, subfolder, revision, repo_type)
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


def _fetcher(location: Location, options: HubOptions) -> Callable[..., str]:
    def fetch(name: str, revision: str | None, *, cache_only: bool = False) -> str:
        return hf_hub_download(
            location.repo_id,
            name,
            subfolder=location.subfolder,
            repo_type=location.repo_type,
            revision=revision,
            token=options.token,
            cache_dir=options.cache_path,
            local_files_only=options.local_files_only or cache_only,
            force_download=options.force_download,
        )

    return fetch


def _fetch_manifest(
    location: Location, fetch: Callable[..., str], local_files_only: bool, *, prefer_sharded: bool
) -> str:
    """Download the state's manifest; returns its local path.

    A folder may hold both an ordinary and a sharded checkpoint (``consolidate_to``): the sharded one is taken
    first for a sharded optimizer (``prefer_sharded``), last otherwise.
    """
    # The index takes precedence (as locally). If it cannot be had from the Hub nor the cache (offline, or the Hub
    # unreachable), the single-file manifest may still be cached: look there only, without a second round of
    # connection retries.
    unreachable: LocalEntryNotFoundError | None = None
    names: tuple[str, ...] = (OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME)
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


def _commit_of(location: Location, manifest_path: str) -> str:
    """The commit a downloaded file belongs to: its cache snapshot folder's name."""
    snapshot = os.path.dirname(manifest_path)
    for _ in location.subfolder.split("/") if location.subfolder else ():
        snapshot = os.path.dirname(snapshot)
    return os.path.basename(snapshot)


def _fetch_files(
    location: Location,
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


def download_state(location: Location, options: HubOptions) -> str:
    """Download the manifest, then the files it references; returns the local folder."""
    fetch = _fetcher(location, options)
    manifest_path = _fetch_manifest(location, fetch, options.local_files_only, prefer_sharded=False)
    _fetch_files(location, fetch, manifest_path, _referenced(manifest_path), options.local_files_only)
    return os.path.dirname(manifest_path)


def cache_if_unreachable(location: Location, options: HubOptions) -> HubOptions:
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
                cache_dir=os.fspath(options.cache_dir) if options.cache_dir is not None else None,
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
    outcome: list[_T] = []
    error: Exception | None = None
    try:
        outcome.append(work(not first))
    except Exception as err:
        error = err
    if first:
        sharded.barrier()
    message = sharded.agree(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"downloading the optimizer state failed on another process: {message}")
    return outcome[0]


def download_sharded(location: Location, model: torch.nn.Module, opt: Any, options: HubOptions) -> str:
    """The state for a sharded (FSDP2) optimizer, downloaded once per machine: the manifest, then only the shard
    files this machine's processes read (every file of an ordinary checkpoint). A collective."""
    local_only = options.local_files_only

    def manifest(where: Location) -> Callable[[bool], str]:
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
