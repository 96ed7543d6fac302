"""hf_optim's safetensors ZeRO state in Trainer and Accelerate checkpoints under DeepSpeed.

Thin over :func:`hf_optim.save_state` / :func:`hf_optim.load_state` with ``model=`` the engine (tested on CPU
with gloo in ``tests/deepspeed``): every process writes its own partition (format version 3) and resumes on
any number of processes and any ZeRO stage. What Trainer and Accelerate add is only where the files go and
when the model's weights are loaded, which needs DeepSpeed on GPUs (``scripts/gpu_check.sh`` runs it there):
on a CPU-only machine Accelerate counts one process while DeepSpeed runs several (see the README).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from typing import Any

import torch

from hf_optim._utils import unwrap_engine
from hf_optim.errors import CheckpointError
from hf_optim.state import SHARDED_MANIFEST_NAME, load_state, save_state
from hf_optim.state.io import checkpoint_roots, open_file, read_json, read_safetensors, read_tensors
from hf_optim.state.zero import find_zero

__all__ = [
    "assign_weights",
    "has_zero_state",
    "is_zero",
    "load_model_weights",
    "load_zero_state",
    "save_zero_state",
    "weights_loader",
]

SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def is_zero(optimizer: Any, model: Any) -> bool:
    """Whether ``optimizer`` (or ``model``, the engine) is DeepSpeed ZeRO's."""
    return find_zero(optimizer, model) is not None


def has_zero_state(checkpoint: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint folder holds hf_optim's sharded-family state (and not DeepSpeed's pickles)."""
    folder = os.fspath(checkpoint)
    return os.path.isfile(os.path.join(folder, SHARDED_MANIFEST_NAME)) and not glob.glob(
        os.path.join(glob.escape(folder), "global_step*")
    )


def save_zero_state(directory: str | os.PathLike[str], optimizer: Any, scheduler: Any, engine: Any) -> None:
    """Save on every process (a collective): each writes its own partition."""
    save_state(directory, optimizer, scheduler, model=engine)


def load_zero_state(directory: str | os.PathLike[str], optimizer: Any, scheduler: Any, engine: Any) -> Any:
    """Load on every process (a collective), after the model's weights (:func:`load_model_weights`)."""
    return load_state(directory, optimizer, scheduler, model=engine)


def _read_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """``model.safetensors`` or the files its index names, each opened once inside the checkpoint folder."""
    single = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if os.path.lexists(single):
        files = [SAFE_WEIGHTS_NAME]
    else:
        index_file = open_file(
            os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME), roots=checkpoint_roots(checkpoint)
        )
        try:
            index = read_json(index_file)
        finally:
            index_file.close()
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{checkpoint}: {SAFE_WEIGHTS_INDEX_NAME} has no weight_map of file names")
        files = sorted(set(weight_map.values()))
    roots = checkpoint_roots(checkpoint)
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if os.path.basename(name) != name or not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{checkpoint}: weight file {name!r} is not a safetensors file of the folder"
            )
        file = open_file(os.path.join(checkpoint, name), roots=roots)
        try:
            st = read_safetensors(file)
            weights.update(read_tensors(st, st.entries))
        finally:
            file.close()
    return weights


def assign_weights(engine: Any, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` (full tensors, already checked) into a DeepSpeed engine's module, on every process:
    under ZeRO-3 through ``GatheredParameters`` (rank 0 writes, DeepSpeed re-partitions)."""
    import deepspeed
    import torch.distributed as dist

    module = unwrap_engine(engine)
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):  # ZeRO-3: the parameters are partitioned
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                module.load_state_dict(weights, strict=False)
    else:
        module.load_state_dict(weights, strict=False)


def load_model_weights(
    engine: Any, checkpoint: str | os.PathLike[str], load_module_strict: bool = True
) -> None:
    """Load a checkpoint's model weights (``model.safetensors`` or its index, as Trainer saves them) into a
    DeepSpeed engine's module, on every process (:func:`assign_weights`). Then the optimizer state:
    :func:`load_zero_state`."""
    module = unwrap_engine(engine)
    weights = _read_weights(os.fspath(checkpoint))
    # checked on every process before loading (tied weights are stored once, under their first name)
    missing = sorted({name for name, _ in module.named_parameters()} - set(weights))
    unexpected = sorted(set(weights) - set(module.state_dict()))
    if load_module_strict and (missing or unexpected):
        raise CheckpointError(
            f"{checkpoint}: model weights missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    assign_weights(engine, weights)


@contextlib.contextmanager
def weights_loader(checkpoint: str | None) -> Iterator[None]:
    """Within the block, transformers' Trainer resumes a DeepSpeed run from a checkpoint that holds hf_optim's
    state (no ``global_stepN/``) by loading the model's weights with :func:`load_model_weights`; it loads the
    optimizer state itself afterwards (``_load_optimizer_and_scheduler``)."""
    if checkpoint is None or not has_zero_state(checkpoint):
        yield
        return
    import transformers.trainer as trainer_module

    original = trainer_module.deepspeed_load_checkpoint
    trainer_module.deepspeed_load_checkpoint = load_model_weights
    try:
        yield
    finally:
        trainer_module.deepspeed_load_checkpoint = original
