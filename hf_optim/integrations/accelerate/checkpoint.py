"""Accelerate checkpoints without pickle: Accelerate writes the model weights (safetensors), RNG states, samplers
and its step counter; hf_optim writes the optimizer / scheduler / accumulator state and the objects registered
with ``accelerator.register_for_checkpointing`` as safetensors + JSON.

Accelerate's own ``save_state`` pickles the optimizer and scheduler (``optimizer.bin`` / ``scheduler.bin``, read
back with ``weights_only=True``) and the registered objects (``custom_checkpoint_N.pkl``, read back with
``torch.load(weights_only=False)``: a checkpoint folder could run arbitrary code). Here:

- :func:`accelerate_save_state` / :func:`accelerate_load_state` are the explicit form;
- :func:`use_safetensors_state` makes ``accelerator.save_state()`` / ``load_state()`` themselves use them.

A load validates every file first (model weights, hf_optim state, registered objects, the files Accelerate will
read), then changes the live objects; if any later step raises, the optimizers, schedulers, accumulator,
registered objects, RNG states, scaler and step counter are put back as they were. A folder holding pickled
``custom_checkpoint_N.pkl`` files (plain Accelerate) is refused unless ``allow_pickle=True``.

What Accelerate itself reads (accelerate 1.15, ``checkpointing.load_accelerator_state``) goes through
``accelerate.utils.load``, which sets ``weights_only=True`` unless told otherwise: ``random_states_N.pkl`` (with
an allow-list of numpy globals), ``scaler.pt``, ``sampler.bin``, ``dl_state_dict.bin``. hf_optim never passes
``load_kwargs``, so none of these can unpickle arbitrary objects; model files are read by hf_optim
(safetensors), never by Accelerate's ``pytorch_model.bin`` fallback.

Single-process and DDP-style runs (CPU/GPU/XPU/..., also ``MULTI_CPU``) and FSDP2 are supported. Under FSDP2 every
process writes its own shard of the optimizer state (:func:`hf_optim.save_state` with ``model=``) and Accelerate
saves and loads the sharded model its own way; this path is thin over the torch-level functions tested on CPU, and
has not been run on GPUs here (Accelerate enables FSDP on GPUs only): ``scripts/gpu_check.sh`` checks it. Under
DeepSpeed the prepared model is the engine: every process writes its ZeRO partition (:func:`hf_optim.save_state`
with ``model=`` the engine), the main process the engine's full weights (``accelerator.get_state_dict``; ZeRO-3
needs ``stage3_gather_16bit_weights_on_model_save``), and Accelerate never calls DeepSpeed's own (pickled)
checkpointing; loads put the weights back first, then the optimizer state. FSDP1 and Megatron-LM keep sharded
optimizer state that this format does not describe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType

from hf_optim._utils import is_hub_url, unwrap_optimizer
from hf_optim.errors import CheckpointError
from hf_optim.hub import download_checkpoint, resolve_state_dir
from hf_optim.integrations.accelerate import internals
from hf_optim.integrations.accelerate.model_weights import (
    bare_model,
    read_model_weights,
    save_weights,
    skip_model_loading,
    unwrapped_weights_hook,
    weights_path,
)
from hf_optim.integrations.accelerate.prepare import is_hf_optim_scheduler
from hf_optim.integrations.accelerate.rollback import Snapshot
from hf_optim.integrations.accelerate.run_state import (
    PICKLED_RNG_NAME,
    load_run_state,
    read_run_state,
    run_state_files,
    save_run_state,
)
from hf_optim.integrations.deepspeed import assign_weights
from hf_optim.state import (
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    has_sharded_state,
    inspect_state,
    load_object_state,
    load_state,
    save_object_state,
    save_state,
)

__all__ = [
    "REGISTERED_STATE_NAME",
    "accelerate_load_state",
    "accelerate_save_state",
    "check_checkpoint_support",
]

logger = logging.getLogger(__name__)

#: The state of the i-th object registered with ``accelerator.register_for_checkpointing``.
REGISTERED_STATE_NAME = "custom_checkpoint_{}.safetensors"
_REGISTERED_STATE_RE = re.compile(r"^custom_checkpoint_(\d+)\.safetensors$")
# What plain Accelerate writes for registered objects (and reads with torch.load(weights_only=False)).
_PICKLED_REGISTERED_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
_REGISTERED_KIND = "accelerate.registered_object"

# Accelerate writes the first model as ``model.safetensors`` and the i-th as ``model_{i}.safetensors``.
# The state of the i-th prepared optimizer (i > 0) goes into this sub-folder of the checkpoint.
_EXTRA_OPTIMIZER_DIR = "optimizer_{}"
_DEEPSPEED_ACCUMULATES = (
    "accumulator: under DeepSpeed, gradients are accumulated by DeepSpeed (gradient_accumulation_steps in its "
    "config), not by a GradientAccumulator"
)
# Accelerate's other files (accelerate.utils.constants): RNG, scaler, samplers, stateful dataloaders.
_SCALER_NAME = "scaler.pt"

_SHARDED_STATE = (DistributedType.MEGATRON_LM, DistributedType.FSDP)


# --------------------------------------------------------------------------------------------------------------
# Registered objects: their state_dict() as a value tree in one safetensors file (tensors + JSON metadata)
# --------------------------------------------------------------------------------------------------------------


def _save_registered(path: str, state_dict: Any) -> None:
    """Write a registered object's ``state_dict()`` to ``path`` (one safetensors file, atomic)."""
    save_object_state(path, state_dict, kind=_REGISTERED_KIND)


def _load_registered(path: str) -> Any:
    """Read and validate a file written by :func:`_save_registered`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    return load_object_state(path, kind=_REGISTERED_KIND)


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def accelerate_save_state(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    accumulator: Any | None = None,
    safe_serialization: bool = True,
) -> str:
    """Save a resumable checkpoint with no pickled optimizer, scheduler or registered-object files.

    Accelerate writes the model weights (under the unwrapped model's parameter names, so a checkpoint from N
    processes loads into a run with M), the RNG states, samplers and step counter, and applies its automatic
    checkpoint naming and ``total_limit``. The main process (each node's with ``save_on_each_node``) writes the
    hf_optim state: the first prepared optimizer and its scheduler into the folder itself, the i-th into
    ``optimizer_{i}/``, and the ``state_dict()`` of each object registered with
    ``accelerator.register_for_checkpointing`` into ``custom_checkpoint_{i}.safetensors`` (tensors, numbers,
    strings, booleans, None, and containers of them). Call on every process; all wait until it is complete.

    Args:
        accelerator: The run's ``Accelerator``, after ``prepare``.
        output_dir: The checkpoint folder; ``None`` with ``ProjectConfiguration(automatic_checkpoint_naming=True)``.
        accumulator: A :class:`hf_optim.GradientAccumulator` (process-local), stored with the first optimizer.
        safe_serialization: Model weights as ``model.safetensors`` (``False``: ``pytorch_model.bin``).

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: If ``output_dir`` is not a folder, the accumulator has no optimizer to go with or is saved
            mid-window with several processes.
        NotImplementedError: Under Megatron-LM or FSDP1, which shard optimizer state their own way.
        RuntimeError: If writing failed on another process.

    Example:
        ```python
        import torch
        from accelerate import Accelerator
        import hf_optim

        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        model, optimizer = accelerator.prepare(model, hf_optim.AdamW(model.parameters()))
        assert hf_optim.has_state(hf_optim.accelerate_save_state(accelerator, "ckpt"))
        ```
    """
    check_checkpoint_support(accelerator, "accelerate_save_state")
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise ValueError(f"output_dir: {output_dir!r} exists and is not a directory")
    pairs = _optimizer_scheduler_pairs(accelerator)
    fsdp2, deepspeed = _fsdp2(accelerator), _deepspeed(accelerator)
    if accumulator is not None:
        if deepspeed:
            raise ValueError(_DEEPSPEED_ACCUMULATES)
        if not pairs:
            raise ValueError("accumulator: no prepared optimizer to store it with")
        if accelerator.num_processes > 1 and not fsdp2:
            # Only the main process writes: the other processes' partial sums would be lost mid-window.
            # (Under FSDP2 each process saves its own shard of the gradients, mid-window too.)
            steps = accelerator.gather(torch.tensor([accumulator.step], device=accelerator.device))
            if bool((steps > 0).any()):
                raise ValueError(
                    f"accumulator: mid-window on some process (micro-steps per process: {steps.tolist()}); its "
                    "state is process-local, so save between accumulation windows (after apply_to / reset)"
                )
    _warn_if_scheduler_steps_per_process(accelerator)
    registered = list(internals.registered_objects(accelerator))

    # FSDP2: Accelerate saves the sharded model its own way; DeepSpeed: the engine is hidden from Accelerate (it
    # would write DeepSpeed's pickled checkpoint) and its weights are saved below; otherwise the unwrapped
    # model's weights
    hook = (lambda models, weights, output_dir: None) if fsdp2 else unwrapped_weights_hook(accelerator)
    handle = accelerator.register_save_state_pre_hook(hook)
    try:
        with internals.hidden_from_accelerate(
            accelerator, custom_objects=True, scaler=True, dataloaders=True, models=deepspeed
        ):
            # The class's method: use_safetensors_state replaces the instance's save_state with a call to this.
            location = os.fspath(
                type(accelerator).save_state(accelerator, output_dir, safe_serialization=safe_serialization)
            )
    finally:
        handle.remove()

    writes = (
        accelerator.is_local_main_process
        if accelerator.project_configuration.save_on_each_node
        else accelerator.is_main_process
    )
    error: Exception | None = None
    try:  # every process: its random states (instead of Accelerate's pickle); the writer: scaler, dataloaders
        save_run_state(accelerator, location, writes=writes)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(location, PICKLED_RNG_NAME.format(accelerator.process_index)))
    except Exception as err:  # re-raised below, after telling the other processes
        error = err
    if deepspeed:  # the full weights (gathered under ZeRO-3: a collective), written like Accelerate's
        for index, model in enumerate(internals.models(accelerator)):
            weights = accelerator.get_state_dict(model)
            if writes and error is None:
                try:
                    save_weights(weights, weights_path(location, index, safe_serialization))
                except Exception as err:  # re-raised below, after telling the other processes
                    error = err
    if fsdp2 or deepspeed:  # every process writes its own shard of the optimizer state (a collective)
        for index, (optimizer, scheduler) in enumerate(pairs):
            save_state(
                _state_dir(location, index),
                optimizer,
                scheduler,
                accumulator if index == 0 else None,
                model=_model_of(accelerator, optimizer),
            )
    if writes and error is None:
        try:
            for index, (optimizer, scheduler) in enumerate(pairs if not (fsdp2 or deepspeed) else ()):
                save_state(
                    _state_dir(location, index), optimizer, scheduler, accumulator if index == 0 else None
                )
            for index, obj in enumerate(registered):
                _save_registered(
                    os.path.join(location, REGISTERED_STATE_NAME.format(index)), obj.state_dict()
                )
            for name in os.listdir(location):  # files of more registered objects from an earlier save
                match = _REGISTERED_STATE_RE.match(name)
                if match and int(match.group(1)) >= len(registered):
                    os.remove(os.path.join(location, name))
            logger.debug(
                "Saved hf_optim state of %d optimizer(s) and %d registered object(s) in %s",
                len(pairs),
                len(registered),
                location,
            )
        except Exception as err:  # re-raised below, after telling the other processes
            error = err
    # Acts as the barrier, and makes every process fail (rather than wait forever) if the writer failed.
    failed = accelerator.gather(torch.tensor([error is not None], device=accelerator.device))
    if error is not None:
        raise error
    if bool(failed.any()):
        raise RuntimeError(
            f"accelerate_save_state: writing the hf_optim state into {location!r} failed on another process"
        )
    return location


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def accelerate_load_state(
    accelerator: Accelerator,
    path_or_repo_id: str | os.PathLike[str],
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    accumulator: Any | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> str:
    """Resume from a checkpoint written by :func:`accelerate_save_state`, all or nothing.

    Hub checkpoints are downloaded (:func:`hf_optim.download_checkpoint`) by each node's main process first.
    Every file is validated before anything changes; if a later step raises, the optimizers, schedulers,
    accumulator, registered objects, RNG states, scaler and step counter are restored and the error re-raised.
    Pickled ``custom_checkpoint_N.pkl`` files (what plain ``accelerator.save_state`` writes) are refused:
    Accelerate reads them with ``torch.load(weights_only=False)``, which runs the file's code.

    Args:
        accelerator: The run's ``Accelerator``, after ``prepare``.
        path_or_repo_id: A local folder, a Hub repo id or an ``hf://`` URL.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``, for a Hub repository.
        revision: A branch, tag or commit; ``None``: the default branch.
        subfolder: The checkpoint folder inside the repository.
        token: A Hub token; ``None``: the one ``huggingface_hub`` finds.
        cache_dir: The Hugging Face cache folder; ``None``: the usual one.
        local_files_only: Use the cache only, never download.
        force_download: Download again even if cached.
        accumulator: A :class:`hf_optim.GradientAccumulator` to restore with the first optimizer.
        strict: Refuse any difference between checkpoint and optimizers.
        allow_pickle: Let Accelerate read pickled ``custom_checkpoint_N.pkl`` files: only for files you made.

    Returns:
        The local checkpoint folder.

    Raises:
        CheckpointError: If a file is missing, corrupted, hostile or does not match (nothing is changed then), or
            the folder holds pickles and ``allow_pickle`` is False.
        FileNotFoundError: If there is no such checkpoint.
        ValueError: If the accumulator has no optimizer to go with.
        NotImplementedError: Under Megatron-LM or FSDP1.

    Example:
        ```python
        import torch
        from accelerate import Accelerator
        import hf_optim

        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        model, optimizer = accelerator.prepare(model, hf_optim.AdamW(model.parameters()))
        hf_optim.accelerate_save_state(accelerator, "ckpt")
        hf_optim.accelerate_load_state(accelerator, "ckpt")  # or "user/repo", "hf://user/repo/checkpoint-1000"
        ```
    """
    check_checkpoint_support(accelerator, "accelerate_load_state")
    pairs = _optimizer_scheduler_pairs(accelerator)
    if accumulator is not None and _deepspeed(accelerator):
        raise ValueError(_DEEPSPEED_ACCUMULATES)
    if accumulator is not None and not pairs:
        raise ValueError("accumulator: no prepared optimizer to load its state with")
    hub = {
        "repo_type": repo_type,
        "revision": revision,
        "subfolder": subfolder,
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    with accelerator.local_main_process_first():
        local_dir = _checkpoint_dir(path_or_repo_id, hub)

    # 1. Validate every file before changing anything.
    fsdp2, deepspeed = _fsdp2(accelerator), _deepspeed(accelerator)
    weights = [
        read_model_weights(accelerator, model, local_dir, index)
        for index, model in enumerate(
            internals.models(accelerator) if not fsdp2 else ()
        )  # FSDP2: Accelerate loads them
    ]
    for index in range(len(pairs)):
        state_dir = _state_dir(local_dir, index)
        if (fsdp2 or deepspeed) and has_sharded_state(state_dir):
            continue  # validated on every process by load_state, before anything changes
        if not any(
            os.path.isfile(os.path.join(state_dir, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME)
        ):
            raise FileNotFoundError(
                f"path_or_repo_id: no hf_optim optimizer state ({OPTIMIZER_NAME}) in {state_dir!r}: expected a "
                "checkpoint written by hf_optim.accelerate_save_state (`hf-optim convert` converts Accelerate's)"
            )
        inspect_state(state_dir)  # the files on their own; load_state checks them against the optimizer
    registered_states, accelerate_reads_registered = _read_registered(accelerator, local_dir, allow_pickle)
    ours = run_state_files(accelerator, local_dir)
    _check_accelerate_files(accelerator, local_dir, ours)
    run_state = read_run_state(accelerator, local_dir)

    # 2. Apply, with everything that can change restorable. Under DeepSpeed the optimizer state goes last, after
    # the weights (fp32 runs take their master weights from them), all or nothing in load_state itself.
    snapshot = Snapshot(accelerator, pairs if not deepspeed else [], accumulator)
    module_weights = _module_snapshot(accelerator) if deepspeed else []
    try:
        for index, (optimizer, scheduler) in enumerate(pairs if not deepspeed else ()):
            load_state(
                _state_dir(local_dir, index),
                optimizer,
                scheduler,
                accumulator if index == 0 else None,
                strict=strict,
                model=_model_of(accelerator, optimizer) if fsdp2 else None,
            )
        for obj, state in zip(internals.registered_objects(accelerator), registered_states, strict=False):
            obj.load_state_dict(state)
        # Accelerate: RNG, samplers, scaler, step (and pickled registered objects with allow_pickle=True).
        # The hook keeps it from reading the model files: hf_optim read them above.
        handle = accelerator.register_load_state_pre_hook(
            (lambda models, input_dir: None) if fsdp2 else skip_model_loading
        )
        try:
            with internals.hidden_from_accelerate(
                accelerator,
                custom_objects=not accelerate_reads_registered,
                scaler=ours["scaler"],
                dataloaders=ours["dataloaders"],
                models=deepspeed,
            ):
                type(accelerator).load_state(accelerator, local_dir)
        finally:
            handle.remove()
        load_run_state(accelerator, local_dir, run_state)
        for model, state in zip(internals.models(accelerator), weights, strict=True):
            # names were checked; strict=False allows tied weights stored once
            if deepspeed:
                assign_weights(model, state)
            else:
                bare_model(accelerator, model).load_state_dict(state, strict=False)
        for index, (optimizer, scheduler) in enumerate(pairs if deepspeed else ()):
            load_state(
                _state_dir(local_dir, index),
                optimizer,
                scheduler,
                strict=strict,
                model=_model_of(accelerator, optimizer),
            )
    except BaseException:
        for param, data in module_weights:
            param.data.copy_(data)
        snapshot.restore()
        raise
    logger.debug("Loaded checkpoint from %s", local_dir)
    return local_dir


def _checkpoint_dir(path_or_repo_id: str | os.PathLike[str], hub: dict[str, Any]) -> str:
    """The local checkpoint folder: a local path as is, else the whole folder downloaded from the Hub."""
    value = os.fspath(path_or_repo_id)
    if not is_hub_url(value) and os.path.exists(value):
        # local folder checks (revision is refused for a local folder, subfolder applied)
        return resolve_state_dir(
            value, revision=hub["revision"], subfolder=hub["subfolder"], token=hub["token"]
        )
    return download_checkpoint(value, **hub)


def _read_registered(accelerator: Accelerator, directory: str, allow_pickle: bool) -> tuple[list[Any], bool]:
    """The validated states of the registered objects, or ``([], True)`` when Accelerate must read pickles."""
    names = sorted(os.listdir(directory))
    pickled = [n for n in names if _PICKLED_REGISTERED_RE.match(n)]
    if pickled:
        if not allow_pickle:
            raise CheckpointError(
                f"{os.path.join(directory, pickled[0])}: pickled registered-object state (written by plain "
                "accelerator.save_state); loading it would run any code it holds. Pass allow_pickle=True only "
                "for files you made"
            )
        logger.warning(
            "Letting Accelerate unpickle %s in %s (allow_pickle=True)", ", ".join(pickled), directory
        )
        return [], True
    found = sorted(int(m.group(1)) for m in map(_REGISTERED_STATE_RE.match, names) if m)
    expected = list(range(len(internals.registered_objects(accelerator))))
    if found != expected:
        raise CheckpointError(
            f"{directory}: registered-object files {[REGISTERED_STATE_NAME.format(i) for i in found]} do not "
            f"match the {len(expected)} object(s) registered with accelerator.register_for_checkpointing"
        )
    return [
        _load_registered(os.path.join(directory, REGISTERED_STATE_NAME.format(i))) for i in expected
    ], False


def _check_accelerate_files(accelerator: Accelerator, directory: str, ours: dict[str, bool]) -> None:
    """The files ``accelerator.load_state`` will open exist (when it needs them) and are regular files; ``ours``
    (:func:`run_state_files`) says which parts hf_optim reads instead."""
    required: list[str] = []
    optional = [
        PICKLED_RNG_NAME.format(accelerator.process_index)
    ]  # a run on more processes has no file for new ranks
    if accelerator.scaler is not None and not ours["scaler"]:
        required.append(_SCALER_NAME)
    for index, loader in enumerate(internals.dataloaders(accelerator) if not ours["dataloaders"] else ()):
        suffix = f"_{index}" if index else ""
        get_sampler = getattr(loader, "get_sampler", None)
        if isinstance(getattr(loader, "dataset", None), IterableDatasetShard) and isinstance(
            get_sampler() if get_sampler else None, SeedableRandomSampler
        ):
            required.append(f"sampler{suffix}.bin")
        if getattr(loader, "use_stateful_dataloader", False):
            optional.append(f"dl_state_dict{suffix}.bin")
    for name in required + optional:
        path = os.path.join(directory, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise CheckpointError(f"{path}: not a regular file")
        if name in required and not os.path.lexists(path):
            raise CheckpointError(f"{path}: missing (accelerator.load_state needs it)")


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _fsdp2(accelerator: Accelerator) -> bool:
    """FSDP2 (``fully_shard``): optimizer state is sharded DTensors, which hf_optim saves per process."""
    return accelerator.distributed_type == DistributedType.FSDP and bool(
        getattr(accelerator, "is_fsdp2", False)
    )


def _module_snapshot(accelerator: Accelerator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of this process's part of every model parameter (a ZeRO-3 parameter's partition), to put back."""
    return [
        (param, param.detach().clone())
        for model in internals.models(accelerator)
        for param in model.parameters()
    ]


def _deepspeed(accelerator: Accelerator) -> bool:
    """DeepSpeed: the prepared model is the engine, whose ZeRO optimizer hf_optim saves per process."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _model_of(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The prepared model that holds ``optimizer``'s parameters (it names them in a sharded save); under
    DeepSpeed, the engine (Accelerate prepares one model with one optimizer there)."""
    if _deepspeed(accelerator):
        return internals.models(accelerator)[0]
    inner = unwrap_optimizer(optimizer)
    ids = {id(p) for group in inner.param_groups for p in group["params"]}
    for model in internals.models(accelerator):
        if any(id(p) in ids for p in model.parameters()):
            return model
    raise ValueError("no prepared model holds this optimizer's parameters")


def check_checkpoint_support(accelerator: Accelerator, function: str) -> None:
    if accelerator.distributed_type in _SHARDED_STATE and not _fsdp2(accelerator):
        raise NotImplementedError(
            f"{function} supports single-process, DDP, FSDP2 and DeepSpeed runs; {accelerator.distributed_type} shards "
            "optimizer state its own way, use accelerator.save_state / load_state there"
        )


def _state_dir(checkpoint_dir: str, index: int) -> str:
    return checkpoint_dir if index == 0 else os.path.join(checkpoint_dir, _EXTRA_OPTIMIZER_DIR.format(index))


def _optimizer_scheduler_pairs(accelerator: Accelerator) -> list[tuple[torch.optim.Optimizer, Any | None]]:
    """The prepared optimizers (unwrapped), each with the scheduler (unwrapped) that drives it, if any."""
    optimizers = [unwrap_optimizer(opt) for opt in internals.optimizers(accelerator)]
    schedulers = [
        s.scheduler if isinstance(s, AcceleratedScheduler) else s for s in internals.schedulers(accelerator)
    ]
    paired: list[Any | None] = [None] * len(optimizers)
    for scheduler in schedulers:
        target = getattr(scheduler, "optimizer", None)
        if isinstance(target, torch.optim.Optimizer):
            target = unwrap_optimizer(target)
        index = next((i for i, opt in enumerate(optimizers) if opt is target), None)
        if index is None:
            raise ValueError(
                f"scheduler {type(scheduler).__name__} drives an optimizer that was not prepared with this accelerator"
            )
        if paired[index] is not None:
            raise ValueError(
                f"optimizer {index} is driven by two prepared schedulers; hf_optim stores one per optimizer"
            )
        paired[index] = scheduler
    return list(zip(optimizers, paired, strict=True))


def _warn_if_scheduler_steps_per_process(accelerator: Accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    if _deepspeed(accelerator):
        return  # the engine steps the scheduler once per optimizer step
    for scheduler in internals.schedulers(accelerator):
        if (
            isinstance(scheduler, AcceleratedScheduler)
            and is_hf_optim_scheduler(scheduler.scheduler)
            and scheduler.step_with_optimizer
            and not scheduler.split_batches
        ):
            logger.warning(
                "An hf_optim scheduler is stepped %d times per optimizer step: prepare it with "
                "hf_optim.accelerate_prepare so the checkpoint counts optimizer steps",
                accelerator.num_processes,
            )
