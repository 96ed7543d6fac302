"""Optimizer state from a local directory, a Hub repo id or an ``hf://`` URL: :mod:`hf_optim.state`'s load and
inspect with the Hub added (the manifest downloaded first, then only the files it references)."""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_optim import state
from hf_optim._utils import clean_subfolder, is_hub_url
from hf_optim.hub._download import download_sharded, download_state
from hf_optim.hub._options import HubOptions
from hf_optim.hub._url import locate
from hf_optim.state import LoadReport, ShardedStateInfo, StateInfo, sharded, zero
from hf_optim.state.io import checkpoint_roots

__all__ = ["inspect_state", "load_state", "resolve_state_dir"]


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
    location = locate(value, subfolder, revision, repo_type)
    if model is not None and sharded_optimizer:
        directory = download_sharded(location, model, optimizer, options)
    else:
        directory = download_state(location, options)
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
