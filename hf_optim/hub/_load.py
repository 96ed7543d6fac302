"""Optimizer state from a local directory, a Hub repo id or an ``hf://`` URL: :mod:`hf_optim.state`'s load and
inspect with the Hub added (the manifest downloaded first, then only the files it references)."""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_optim import state
from hf_optim._utils import clean_subfolder, is_hub_url
from hf_optim.hub._download import cache_if_unreachable, download_sharded, download_state
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
    options = cache_if_unreachable(location, options)
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
    """A local directory holding the state: local paths as they are, Hub repo ids / ``hf://`` URLs downloaded.

    From the Hub, the manifest is downloaded first, then only the files it references: for tools that read a
    checkpoint by path (``hf-optim consolidate``, the Accelerate integration).

    Args:
        path_or_repo_id: A local directory, a Hub repo id or an ``hf://`` URL.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        revision: A branch, tag or commit; ``None``: the default branch.
        subfolder: The folder inside the repository (or the local directory) holding the state.
        token: A Hub token; ``None``: the one ``huggingface_hub`` finds (``HF_TOKEN``, the login).
        cache_dir: The Hugging Face cache folder; ``None``: the usual one.
        local_files_only: Use the cache only, never download.
        force_download: Download again even if cached.

    Returns:
        The local folder holding the optimizer state (in the HF cache for a Hub repository).

    Raises:
        TypeError: If ``path_or_repo_id`` is not a path or a string.
        ValueError: If it is a file, or ``revision`` / ``repo_type`` are given for a local directory, or the repo
            id or URL is invalid.
        FileNotFoundError: If it is neither a local directory nor a Hub repo id, or holds no optimizer state.
        CheckpointError: If the repository or revision does not exist, or a file is missing, corrupted or
            inconsistent.
        huggingface_hub.errors.LocalEntryNotFoundError: If the files are not cached and cannot be downloaded.

    Example:
        ```python
        import torch
        import hf_optim

        hf_optim.push_state_to_hub("me/docs-resolve", hf_optim.AdamW(torch.nn.Linear(2, 2).parameters()))
        folder = hf_optim.resolve_state_dir("me/docs-resolve")
        assert hf_optim.has_state(folder) and hf_optim.resolve_state_dir(folder) == folder
        ```
    """
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
    scheduler or accumulator is touched; on any error they are left exactly as they were. State tensors land on
    their parameter's device with their saved dtype and the hyperparameters and the schedule's position are
    restored, so training continues bit for bit.

    Args:
        path_or_repo_id: A local directory, a Hub repo id or an ``hf://`` URL.
        optimizer: The optimizer to restore (built as for the original run).
        scheduler: A learning-rate scheduler to restore too.
        accumulator: A :class:`GradientAccumulator` to restore too.
        strict: Refuse any difference between checkpoint and optimizer; ``False`` loads the matching part and
            the report lists the rest.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        revision: A branch, tag or commit; ``None``: the default branch.
        subfolder: The folder inside the repository (or the local directory) holding the state.
        token: A Hub token; ``None``: the one ``huggingface_hub`` finds (``HF_TOKEN``, the login).
        cache_dir: The Hugging Face cache folder; ``None``: the usual one.
        local_files_only: Use the cache only, never download.
        force_download: Download again even if cached.
        model: The trained model: names the parameters, and is required for sharded (FSDP2, DeepSpeed ZeRO)
            state; call it on every process then (each machine downloads once).

    Returns:
        What was restored and what was skipped.

    Raises:
        TypeError: If ``path_or_repo_id`` is not a path or a string.
        ValueError: If it is a file, or ``revision`` / ``repo_type`` are given for a local directory, or the repo
            id or URL is invalid.
        FileNotFoundError: If it is neither a local directory nor a Hub repo id, or holds no optimizer state.
        CheckpointError: If the repository or revision does not exist, or a file is missing, corrupted or
            inconsistent,
            or (``strict``) does not match the optimizer.
        huggingface_hub.errors.LocalEntryNotFoundError: If the files are not cached and cannot be downloaded.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 2)
        optimizer = hf_optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        hf_optim.save_state("ckpt", optimizer, model=model)

        resumed = hf_optim.AdamW(model.parameters(), lr=1e-3)
        report = hf_optim.load_state("ckpt", resumed, model=model)  # or "user/repo", "hf://user/repo/ckpt"
        assert report.complete and torch.equal(resumed.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
        ```
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
    """Describe a checkpoint from a local directory, a Hub repo id or an ``hf://`` URL, without a model.

    Reads metadata, tensor headers and the step counters only (``hf-optim inspect``). A sharded checkpoint is
    described by :func:`hf_optim.state.inspect_sharded_state`.

    Args:
        path_or_repo_id: A local directory, a Hub repo id or an ``hf://`` URL.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        revision: A branch, tag or commit; ``None``: the default branch.
        subfolder: The folder inside the repository (or the local directory) holding the state.
        token: A Hub token; ``None``: the one ``huggingface_hub`` finds (``HF_TOKEN``, the login).
        cache_dir: The Hugging Face cache folder; ``None``: the usual one.
        local_files_only: Use the cache only, never download.
        force_download: Download again even if cached.

    Returns:
        A :class:`StateInfo`, or a :class:`ShardedStateInfo` for a sharded checkpoint.

    Raises:
        TypeError: If ``path_or_repo_id`` is not a path or a string.
        ValueError: If it is a file, or ``revision`` / ``repo_type`` are given for a local directory, or the repo
            id or URL is invalid.
        FileNotFoundError: If it is neither a local directory nor a Hub repo id, or holds no optimizer state.
        CheckpointError: If the repository or revision does not exist, or a file is missing, corrupted or
            inconsistent.
        huggingface_hub.errors.LocalEntryNotFoundError: If the files are not cached and cannot be downloaded.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = hf_optim.AdamW(torch.nn.Linear(2, 2).parameters())
        hf_optim.push_state_to_hub("me/docs-inspect", optimizer, subfolder="checkpoint-1")
        info = hf_optim.inspect_state("hf://me/docs-inspect/checkpoint-1")
        assert info.optimizer_name == "adamw_hf" and info.num_params == 2
        ```
    """
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
