"""Optimizer state pushed to the Hub: saved into a folder, then uploaded in one commit (by rank 0 for sharded
state), deleting the state files of an earlier push that the new checkpoint does not use."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi

from hf_optim.hub._url import Location, locate
from hf_optim.state import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    save_state,
    sharded,
    zero,
)
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME

__all__ = ["push_state_to_hub"]

logger = logging.getLogger("hf_optim.hub")

# huggingface_hub's split_state_dict_into_shards_factory names shards with the suffix -{i:05d}-of-{n:05d}
_SHARD_GLOB = OPTIMIZER_SHARD_PATTERN.format(suffix="-?????-of-?????")
_STATE_FILES = (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME, SCHEDULER_NAME, ACCUMULATOR_NAME)


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

    Args:
        repo_id: ``"user/repo"`` or an ``hf://`` URL.
        optimizer: The optimizer whose state is pushed.
        scheduler: A learning-rate scheduler to push too.
        accumulator: A :class:`GradientAccumulator` to push too.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        revision: The branch to commit to (created if missing); ``None``: the default branch.
        subfolder: The folder inside the repository (``"checkpoint-500"``); ``None``: the root.
        token: A Hub token with write access; ``None``: the one ``huggingface_hub`` finds.
        commit_message: The commit's message.
        private: Whether a repository created by this call is private.
        create_pr: Open a pull request instead of committing to ``revision``.
        max_shard_size: Split the state into files of at most this size.
        model: The trained model: names the parameters; required for sharded state.
        save_directory: Where the files are written before the upload (default: a temporary folder).

    Returns:
        The commit's ``huggingface_hub.CommitInfo`` (``None`` on the processes other than rank 0).

    Raises:
        ValueError: If the repo id or URL is invalid, or sharded processes span machines without
            ``save_directory``.
        OSError: If the upload failed on rank 0 (reported on every process of a sharded push).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 2)
        optimizer = hf_optim.AdamW(model.parameters())
        scheduler = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
        info = hf_optim.push_state_to_hub("me/docs-push", optimizer, scheduler, subfolder="step-0", model=model)
        assert hf_optim.has_state(hf_optim.download_checkpoint("me/docs-push", subfolder="step-0"))
        ```
    """
    upload = _Upload(
        locate(repo_id, subfolder, revision, repo_type), token, commit_message, private, create_pr
    )
    if sharded.is_sharded(optimizer) or zero.find_zero(optimizer, model) is not None:
        return _push_sharded(optimizer, scheduler, accumulator, model, save_directory, max_shard_size, upload)
    if save_directory is not None:
        save_state(
            save_directory, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size
        )
        return upload.commit(os.fspath(save_directory))
    with tempfile.TemporaryDirectory(prefix="hf_optim-push-") as tmp:
        save_state(tmp, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size)
        return upload.commit(tmp)


@dataclass(frozen=True)
class _Upload:
    """Where and how a saved state folder is committed."""

    location: Location
    token: str | bool | None
    commit_message: str | None
    private: bool | None
    create_pr: bool

    def commit(self, folder: str) -> CommitInfo:
        """One commit of a saved state folder; state files of an earlier push that it does not use are deleted."""
        location = self.location
        api = HfApi(token=self.token)
        repo = api.create_repo(
            location.repo_id, private=self.private, repo_type=location.repo_type, exist_ok=True
        ).repo_id
        if location.revision is not None and not self.create_pr and not location.revision.startswith("refs/"):
            api.create_branch(repo, branch=location.revision, repo_type=location.repo_type, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            path_in_repo=location.subfolder,
            commit_message=self.commit_message or "Upload optimizer state with hf_optim",
            revision=location.revision,
            repo_type=location.repo_type,
            create_pr=self.create_pr,
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
    upload: _Upload,
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
    if save_directory is not None:
        folder = os.fspath(save_directory)
    else:
        folder = sharded.broadcast_text(
            tempfile.mkdtemp(prefix="hf_optim-push-") if sharded.rank() == 0 else ""
        )
    info: CommitInfo | None = None
    error: Exception | None = None
    try:
        save_state(folder, optimizer, scheduler, accumulator, model=model, max_shard_size=max_shard_size)
        if sharded.rank() == 0:
            try:
                info = upload.commit(folder)
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
