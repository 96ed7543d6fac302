"""Model weights in Accelerate checkpoints, read like optimizer state.

Accelerate stores a DDP model under ``module.``-prefixed names; hf_optim stores the unwrapped model's own names so
a checkpoint from N processes loads into a run with M, and reads the weights file (``model[_i].safetensors``, or
``pytorch_model[_i].bin`` saved with ``safe_serialization=False``) through one checked descriptor inside the
checkpoint folder's roots: a link out of the folder, or anything but a regular file, is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from hf_optim.errors import CheckpointError
from hf_optim.state.io import (
    OpenFile,
    checkpoint_roots,
    open_file,
    read_pickle_weights_only,
    read_safetensors,
    read_tensors,
)

__all__ = [
    "bare_model",
    "read_model_weights",
    "save_weights",
    "skip_model_loading",
    "unwrapped_weights_hook",
    "weights_path",
]

_MODEL_STEM = "model"
_PICKLED_MODEL_STEM = "pytorch_model"


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def unwrapped_weights_hook(accelerator: Accelerator) -> Callable[[list[Any], list[Any], str], None]:
    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Accelerate saves DDP models under ``module.``-prefixed names; store the model's own names instead.
        for index, model in enumerate(models[: len(weights)]):
            weights[index] = bare_model(accelerator, model).state_dict()

    return hook


def weights_path(checkpoint_dir: str, index: int, safe_serialization: bool = True) -> str:
    """Where model ``index``'s weights go, named as Accelerate names them: ``model[_i].safetensors``, or
    ``pytorch_model[_i].bin`` with ``safe_serialization=False``."""
    suffix = f"_{index}" if index else ""
    stem = _MODEL_STEM if safe_serialization else _PICKLED_MODEL_STEM
    return os.path.join(checkpoint_dir, f"{stem}{suffix}.{'safetensors' if safe_serialization else 'bin'}")


def save_weights(weights: dict[str, torch.Tensor], path: str) -> None:
    """Write a model's full state dict as Accelerate does: safetensors with tied tensors stored once, or
    ``torch.save`` for a ``.bin`` path (``safe_serialization=False``)."""
    from accelerate.utils import clean_state_dict_for_safetensors
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu() for name, t in weights.items()}
    if path.endswith(".safetensors"):
        tensors = clean_state_dict_for_safetensors(tensors)
        save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def _weights_file(checkpoint_dir: str, index: int) -> str:
    """Model ``index``'s weights as Accelerate names them: ``model[_i].safetensors``, or, saved with
    ``safe_serialization=False``, ``pytorch_model[_i].bin`` (when there is no safetensors file)."""
    suffix = f"_{index}" if index else ""
    path = os.path.join(checkpoint_dir, f"{_MODEL_STEM}{suffix}.safetensors")
    pickled = os.path.join(checkpoint_dir, f"{_PICKLED_MODEL_STEM}{suffix}.bin")
    return pickled if not os.path.lexists(path) and os.path.lexists(pickled) else path


def _read_pickled_weights(file: OpenFile) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin`` (written with ``safe_serialization=False``), read with ``weights_only=True``; it must
    be a dict of tensors."""
    weights = read_pickle_weights_only(file, "a model state_dict")
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(f"{file.path}: not a model state_dict (a dict of tensors)")
    return weights


def read_model_weights(
    accelerator: Accelerator, model: torch.nn.Module, checkpoint_dir: str, index: int
) -> dict[str, torch.Tensor]:
    """Read the weights file of model ``index`` after checking it has exactly the model's tensors and shapes.

    The file is opened once, like optimizer state: it must resolve inside the checkpoint folder (or its Hub cache
    repository's blobs) and be a regular file, and both the header and the tensors are read from that descriptor.
    """
    path = _weights_file(checkpoint_dir, index)
    try:
        file = open_file(path, roots=checkpoint_roots(checkpoint_dir))
    except FileNotFoundError:
        raise FileNotFoundError(f"path_or_repo_id: model weights {path!r} not found") from None
    try:
        if path.endswith(".bin"):
            pickled = _read_pickled_weights(file)
            shapes = {name: tuple(t.shape) for name, t in pickled.items()}
        else:
            st = read_safetensors(file)
            shapes = {name: header.shape for name, header in st.entries.items()}
        state = bare_model(accelerator, model).state_dict(keep_vars=True)
        # a ZeRO-3 parameter holds only this process's partition; its full shape is ds_shape
        expected = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in state.items()}
        found = {_strip_wrapper_prefix(name): shape for name, shape in shapes.items()}
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        # Tied weights are stored once (safetensors refuses shared storage): a missing tensor that shares storage
        # with a stored one is restored through it.
        stored = {state[name].untyped_storage().data_ptr() for name in found if name in state}
        missing = [name for name in missing if state[name].untyped_storage().data_ptr() not in stored]
        if missing or unexpected:
            raise CheckpointError(
                f"path_or_repo_id: model weights {path!r} do not match model {index}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, shape in sorted(found.items()):
            if expected[name] != shape:
                raise CheckpointError(
                    f"path_or_repo_id: model weights {path!r}: {name} has shape {list(shape)}, "
                    f"the model expects {list(expected[name])}"
                )
        tensors = pickled if path.endswith(".bin") else read_tensors(st, st.entries)
        return {_strip_wrapper_prefix(k): v for k, v in tensors.items()}
    finally:
        file.close()


def _strip_wrapper_prefix(name: str) -> str:
    # Checkpoints written by a plain accelerator.save_state under DDP / torch.compile carry wrapper prefixes.
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def skip_model_loading(models: list[Any], input_dir: str) -> None:
    """``load_state`` pre-hook: hf_optim loads the model weights itself (under unwrapped names)."""
    models.clear()
