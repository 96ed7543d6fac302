"""Accelerate's own run state as safetensors + JSON: random number generators, the gradient scaler, dataloader
samplers and stateful-dataloader positions.

Plain ``accelerator.save_state`` pickles them (``random_states_N.pkl``, ``scaler.pt``, ``sampler.bin``,
``dl_state_dict.bin``). hf_optim writes each as one safetensors file (``hf_optim.state.save_object_state``)
instead: ``random_states_N.safetensors`` per process, the others by the writing process. Folders written before
are still read: their pickles with ``torch.load(weights_only=True)`` (numpy's RNG types allowed, as Accelerate
allows them), and what cannot be restored that way is named in a warning instead of being skipped in silence.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

from hf_optim.errors import CheckpointError
from hf_optim.integrations.accelerate import internals
from hf_optim.state import load_object_state, save_object_state
from hf_optim.state.io import checkpoint_roots, open_file, read_pickle_weights_only

__all__ = [
    "PICKLED_RNG_NAME",
    "RNG_NAME",
    "load_run_state",
    "read_run_state",
    "run_state_files",
    "save_run_state",
]

logger = logging.getLogger(__name__)

RNG_NAME = "random_states_{}.safetensors"
PICKLED_RNG_NAME = "random_states_{}.pkl"
SCALER_NAME = "scaler.safetensors"
_PICKLED_SCALER_NAME = "scaler.pt"
_KIND = "accelerate.{}"


def _loader_files(index: int) -> tuple[str, str]:
    suffix = f"_{index}" if index else ""
    return f"sampler{suffix}.safetensors", f"dl_state_dict{suffix}.safetensors"


def _seedable_sampler(loader: Any) -> SeedableRandomSampler | None:
    get_sampler = getattr(loader, "get_sampler", None)
    sampler = get_sampler() if get_sampler is not None else None
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDatasetShard) and isinstance(sampler, SeedableRandomSampler):
        return sampler
    return None


def _rng_state(step: int) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "step": step,
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: Any, path: str) -> int | None:
    """Restore the generators from a state written by :func:`_rng_state`; returns the saved step."""
    try:
        python, numpy_state = state["python"], state["numpy"]
        python_state = (
            int(python["version"]),
            tuple(int(v) for v in python["state"].tolist()),
            python["gauss"],
        )
        numpy_tuple = (
            str(numpy_state["kind"]),
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
        torch_state = state["torch"]
        step = state.get("step")
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a random-state file ({type(err).__name__}: {err})") from None
    cuda = state.get("cuda") if torch.cuda.is_available() else None
    try:
        _set_generators(python_state, numpy_tuple, torch_state, cuda)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the random states cannot be restored: {err}") from None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _set_generators(python_state: Any, numpy_state: Any, torch_state: Any, cuda: Any = None) -> None:
    """Set Python's, numpy's and torch's generators (and CUDA's, if given) together: if one refuses its state,
    the others are put back as they were and the error is re-raised."""
    previous = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    except BaseException:
        random.setstate(previous[0])
        np.random.set_state(previous[1])
        torch.set_rng_state(previous[2])
        raise


def save_run_state(accelerator: Accelerator, directory: str, *, writes: bool) -> None:
    """Write this process's random states; with ``writes``, also the scaler and the dataloaders' states."""
    save_object_state(
        os.path.join(directory, RNG_NAME.format(accelerator.process_index)),
        _rng_state(accelerator.step),
        kind=_KIND.format("random_states"),
    )
    if not writes:
        return
    if accelerator.scaler is not None:
        save_object_state(
            os.path.join(directory, SCALER_NAME), accelerator.scaler.state_dict(), kind=_KIND.format("scaler")
        )
    for index, loader in enumerate(internals.dataloaders(accelerator)):
        sampler_name, position_name = _loader_files(index)
        sampler = _seedable_sampler(loader)
        if sampler is not None:
            state = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
            save_object_state(os.path.join(directory, sampler_name), state, kind=_KIND.format("sampler"))
        if getattr(loader, "use_stateful_dataloader", False):
            save_object_state(
                os.path.join(directory, position_name), loader.state_dict(), kind=_KIND.format("dataloader")
            )


def run_state_files(accelerator: Accelerator, directory: str) -> dict[str, bool]:
    """Which of Accelerate's parts this folder holds as hf_optim files: ``{"scaler": ..., "dataloaders": ...}``.
    Where a part is there, Accelerate is kept from reading its pickled counterpart."""
    loaders = [
        name
        for index, loader in enumerate(internals.dataloaders(accelerator))
        for name, needed in zip(
            _loader_files(index),
            (_seedable_sampler(loader) is not None, getattr(loader, "use_stateful_dataloader", False)),
            strict=True,
        )
        if needed
    ]
    return {
        "scaler": os.path.lexists(os.path.join(directory, SCALER_NAME)),
        "dataloaders": bool(loaders) and all(os.path.lexists(os.path.join(directory, n)) for n in loaders),
    }


def read_run_state(accelerator: Accelerator, directory: str) -> dict[str, Any]:
    """Read and check every run-state file hf_optim wrote in ``directory`` (nothing is applied)."""
    read: dict[str, Any] = {}
    rng = os.path.join(directory, RNG_NAME.format(accelerator.process_index))
    if os.path.lexists(rng):
        read["rng"] = (rng, load_object_state(rng, kind=_KIND.format("random_states")))
    parts = run_state_files(accelerator, directory)
    if parts["scaler"] and accelerator.scaler is not None:
        read["scaler"] = load_object_state(os.path.join(directory, SCALER_NAME), kind=_KIND.format("scaler"))
    if parts["dataloaders"]:
        loaders = []
        for index, loader in enumerate(internals.dataloaders(accelerator)):
            sampler_name, position_name = _loader_files(index)
            sampler = (
                load_object_state(os.path.join(directory, sampler_name), kind=_KIND.format("sampler"))
                if _seedable_sampler(loader) is not None
                else None
            )
            position = (
                load_object_state(os.path.join(directory, position_name), kind=_KIND.format("dataloader"))
                if getattr(loader, "use_stateful_dataloader", False)
                else None
            )
            loaders.append((sampler, position))
        read["dataloaders"] = loaders
    return read


def load_run_state(accelerator: Accelerator, directory: str, read: dict[str, Any]) -> None:
    """Apply what :func:`read_run_state` read; without hf_optim's random-state file, read an older folder's
    pickled one with ``weights_only=True``, warning (naming the file) if it cannot be restored."""
    if "scaler" in read:
        accelerator.scaler.load_state_dict(read["scaler"])
    for loader, (sampler_state, position) in zip(
        internals.dataloaders(accelerator), read.get("dataloaders", ()), strict=False
    ):
        sampler = _seedable_sampler(loader)
        if sampler is not None and sampler_state is not None:
            sampler.epoch, sampler.initial_seed = (
                int(sampler_state["epoch"]),
                int(sampler_state["initial_seed"]),
            )
        if position is not None:
            loader.load_state_dict(position)
    if "rng" in read:
        path, state = read["rng"]
        step = _set_rng_state(state, path)
    else:
        step = _load_pickled_rng(accelerator, directory)
    if step is not None:
        accelerator.step = step


def _load_pickled_rng(accelerator: Accelerator, directory: str) -> int | None:
    path = os.path.join(directory, PICKLED_RNG_NAME.format(accelerator.process_index))
    if not os.path.lexists(path):
        return None
    try:
        file = open_file(path, roots=checkpoint_roots(directory))
        try:
            state = read_pickle_weights_only(file, "random states", allowed=_NUMPY_RNG_TYPES)
        finally:
            file.close()
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a dict of random states")
        _set_generators(state["random_state"], state["numpy_random_seed"], state["torch_manual_seed"])
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        logger.warning(
            "%s: the Python, numpy and torch random states could not be restored (%s); training goes on with "
            "the current ones",
            path,
            first[:300],
        )
        return None
    step = state.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# what numpy's legacy RNG state pickles to: arrays of numbers, nothing that runs code (Accelerate's own list)
_NUMPY_RNG_TYPES: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # numpy >= 2 (accelerate requires it)
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    codecs.encode,
]
