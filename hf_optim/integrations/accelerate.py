"""Accelerate integration: prepared schedules counted in optimizer steps, item-normalised gradient
accumulation across micro-batches and processes, and checkpoints whose optimizer / scheduler / accumulator
state is stored in hf_optim's safetensors + JSON format instead of Accelerate's pickled ``optimizer.bin``.

Everything here works with a plain Accelerate loop::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=3e-4, weight_decay=0.01)
    scheduler = hf_optim.create_scheduler("linear", optimizer, num_warmup_steps=100, num_training_steps=1000)
    model, optimizer, loader, scheduler = hf_optim.accelerate_prepare(accelerator, model, optimizer, loader, scheduler)
    normalizer = hf_optim.ItemNormalizer(accelerator, model)
    for batch in loader:
        with accelerator.accumulate(model):
            loss_sum, num_items = ...  # loss summed (not averaged) over the items of this micro-batch
            normalizer.backward(loss_sum, num_items)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

Only single-process and DDP-style runs (CPU/GPU/XPU/..., also ``MULTI_CPU``) are supported by the checkpoint
functions: FSDP, DeepSpeed and Megatron-LM keep sharded optimizer state that this format does not describe.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file

from hf_optim._utils import is_hub_url as _is_url
from hf_optim._utils import parameters_of
from hf_optim._utils import unwrap_optimizer as _unwrap_optimizer
from hf_optim.hub import download_checkpoint, resolve_state_dir
from hf_optim.state import (
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    load_state,
    save_state,
)

__all__ = [
    "ItemNormalizer",
    "accelerate_load_state",
    "accelerate_prepare",
    "accelerate_save_state",
    "step_once_per_optimizer_step",
]

logger = logging.getLogger(__name__)

# Accelerate writes the first model as ``model.safetensors`` and the i-th as ``model_{i}.safetensors``.
_MODEL_STEM = "model"
# The state of the i-th prepared optimizer (i > 0) goes into this sub-folder of the checkpoint.
_EXTRA_OPTIMIZER_DIR = "optimizer_{}"

_NO_GRADIENT_ACCESS = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
_SHARDED_STATE = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.FSDP)


# --------------------------------------------------------------------------------------------------------------
# Schedules counted in optimizer steps
# --------------------------------------------------------------------------------------------------------------


def step_once_per_optimizer_step(scheduler: AcceleratedScheduler) -> AcceleratedScheduler:
    """Make a prepared scheduler advance exactly once per optimizer step, whatever the number of processes.

    With ``split_batches=False`` (Accelerate's default) ``AcceleratedScheduler.step`` steps the wrapped scheduler
    ``num_processes`` times per optimizer step, which suits schedules counted in samples-per-process but makes a
    schedule whose ``num_training_steps`` is counted in optimizer steps finish ``num_processes`` times too early.
    Setting the wrapper's ``split_batches`` flag keeps all its other behaviour (no step on non-sync micro-steps,
    no step when the optimizer step was skipped after an fp16 overflow) and removes only the repetition.
    Returns ``scheduler`` for chaining.
    """
    if not isinstance(scheduler, AcceleratedScheduler):
        raise TypeError(
            f"scheduler must be the AcceleratedScheduler returned by accelerator.prepare, got {type(scheduler).__name__}"
        )
    scheduler.split_batches = True
    return scheduler


def accelerate_prepare(
    accelerator: Accelerator, *objects: Any, device_placement: list[bool] | None = None
) -> Any:
    """``accelerator.prepare(*objects)``, then make every scheduler built by hf_optim step once per optimizer step.

    hf_optim schedules (those carrying ``hf_optim_config``) count ``num_warmup_steps`` / ``num_training_steps`` in
    optimizer steps, so the same arguments give the same learning rates with 1 or N processes and checkpoints can
    be resumed with another number of processes. Other schedulers keep Accelerate's behaviour. Returns what
    ``accelerator.prepare`` returns (one object, or a tuple in the order given).
    """
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, AcceleratedScheduler) and _is_hf_optim_scheduler(obj.scheduler):
            step_once_per_optimizer_step(obj)
    return prepared


def _is_hf_optim_scheduler(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "hf_optim_config", None), dict)


# --------------------------------------------------------------------------------------------------------------
# Item-normalised gradient accumulation
# --------------------------------------------------------------------------------------------------------------


class ItemNormalizer:
    """Item-normalised loss for gradient accumulation with Accelerate, across micro-batches AND processes.

    Averaging a per-micro-batch *mean* loss over-weights the items of short micro-batches (the 2024 gradient
    accumulation bug); averaging over processes does the same across processes. The update should instead use
    ``sum of every item's loss / number of items`` over the whole accumulation window of every process.

    Call :meth:`backward` with the loss *summed* over the items of the micro-batch and their count, inside
    ``accelerator.accumulate(model)``, in place of ``accelerator.backward(loss)``. Gradients accumulate as sums
    (Accelerate's division by ``gradient_accumulation_steps`` and DDP's average over processes are undone);
    on the micro-step that synchronises gradients, the item counts of all processes are summed with one
    all-reduce and the gradients are divided by that total, before your ``clip_grad_norm_`` / ``optimizer.step()``.
    No batch has to be read ahead, so the last, shorter window of an epoch is handled as Accelerate syncs it.

    After each synchronising step :attr:`loss` is the mean loss per item over the window (all processes) and
    :attr:`num_items` the number of items: log those. Not supported under DeepSpeed / Megatron-LM, whose
    engines own the gradients.
    """

    def __init__(self, accelerator: Accelerator, model_or_params: torch.nn.Module | Iterable[Any]) -> None:
        if accelerator.distributed_type in _NO_GRADIENT_ACCESS:
            raise NotImplementedError(
                f"ItemNormalizer needs access to the gradients, which {accelerator.distributed_type} keeps inside its "
                "engine; pass num_items_in_batch to the model's loss instead"
            )
        self.accelerator = accelerator
        # Each parameter once: a gradient listed twice must not be scaled twice.
        self._params = list(
            {id(p): p for p in parameters_of(model_or_params, "model_or_params") if p.requires_grad}.values()
        )
        if not self._params:
            raise ValueError(
                "model_or_params: expected a model or parameters with requires_grad=True, got none"
            )
        self._window: torch.Tensor | None = None  # [loss sum, item count] of this process's current window
        self.loss: float | None = None
        self.num_items: int | None = None

    def backward(self, loss_sum: torch.Tensor, num_items: int | torch.Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss_sum`` (summed over ``num_items`` items); normalise when gradients synchronise.

        ``kwargs`` go to ``accelerator.backward``.
        """
        if not isinstance(loss_sum, torch.Tensor) or loss_sum.numel() != 1:
            raise ValueError(
                f"loss_sum must be a scalar tensor (the loss summed over items), got {loss_sum!r}"
            )
        count = _item_count(num_items)
        self.accelerator.backward(loss_sum, **kwargs)
        device = self.accelerator.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        entry = torch.stack([loss_sum.detach().reshape(()).to(device, dtype), count.to(device, dtype)])
        self._window = entry if self._window is None else self._window + entry
        if self.accelerator.sync_gradients:
            self._normalise()

    def _normalise(self) -> None:
        totals = self.accelerator.reduce(self._window, reduction="sum")
        self._window = None
        loss_total, items = totals.tolist()
        self.num_items = round(items)
        self.loss = loss_total / items if items > 0 else float("nan")
        # accelerator.backward divided each micro-batch by gradient_accumulation_steps and DDP averaged over
        # num_processes: undo both, then divide by the global item count (0 items leave zero gradients).
        scale = (
            self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes / max(items, 1.0)
        )
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)


def _item_count(num_items: int | torch.Tensor) -> torch.Tensor:
    if isinstance(num_items, torch.Tensor):
        # No value check on tensors: reading one would synchronise with the device at every micro-step.
        if (
            num_items.numel() != 1
            or num_items.is_floating_point()
            or num_items.is_complex()
            or num_items.dtype == torch.bool
        ):
            raise ValueError(
                f"num_items must be a scalar integer tensor (a count of items), got {num_items!r}"
            )
        return num_items.detach().reshape(())
    if isinstance(num_items, int) and not isinstance(num_items, bool):
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        return torch.tensor(num_items)
    raise ValueError(f"num_items must be an int or a scalar integer tensor, got {num_items!r}")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: Accelerate for models / RNG / dataloaders / custom objects, hf_optim's format for the rest
# --------------------------------------------------------------------------------------------------------------


def accelerate_save_state(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str] | None,
    *,
    accumulator: Any | None = None,
) -> str:
    """Save a resumable checkpoint: ``accelerator.save_state`` without its pickled optimizer/scheduler files,
    plus the optimizer, scheduler and accumulator state in hf_optim's safetensors + JSON format.

    Accelerate still writes the model weights (``model.safetensors``, stored under the unwrapped model's
    parameter names so a checkpoint from N processes loads into a run with M), the RNG states, dataloader
    samplers and registered custom objects, and applies its automatic checkpoint naming (``output_dir=None``).
    The main process (each node's main process with ``save_on_each_node``) writes the hf_optim state: the first
    prepared optimizer and its scheduler into the checkpoint folder itself, the i-th into ``optimizer_{i}/``.
    ``accumulator`` (a :class:`hf_optim.GradientAccumulator`) is stored with the first optimizer; it is
    process-local, so with several processes it can only be saved between accumulation windows (else
    ``ValueError``). Call on every process; all wait until the checkpoint is complete. Returns its folder.
    """
    _check_checkpoint_support(accelerator, "accelerate_save_state")
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise ValueError(f"output_dir: {output_dir!r} exists and is not a directory")
    pairs = _optimizer_scheduler_pairs(accelerator)
    if accumulator is not None:
        if not pairs:
            raise ValueError("accumulator: no prepared optimizer to store it with")
        if accelerator.num_processes > 1:
            # Only the main process writes: the other processes' partial sums would be lost mid-window.
            steps = accelerator.gather(torch.tensor([accumulator.step], device=accelerator.device))
            if bool((steps > 0).any()):
                raise ValueError(
                    f"accumulator: mid-window on some process (micro-steps per process: {steps.tolist()}); its "
                    "state is process-local, so save between accumulation windows (after apply_to / reset)"
                )
    _warn_if_scheduler_steps_per_process(accelerator)

    handle = accelerator.register_save_state_pre_hook(_unwrapped_weights_hook(accelerator))
    try:
        with _without_optimizers_and_schedulers(accelerator):
            location = os.fspath(accelerator.save_state(output_dir, safe_serialization=True))
    finally:
        handle.remove()

    writes = (
        accelerator.is_local_main_process
        if accelerator.project_configuration.save_on_each_node
        else accelerator.is_main_process
    )
    error: Exception | None = None
    if writes:
        try:
            for index, (optimizer, scheduler) in enumerate(pairs):
                save_state(
                    _state_dir(location, index), optimizer, scheduler, accumulator if index == 0 else None
                )
            logger.info("Saved hf_optim state of %d optimizer(s) in %s", len(pairs), location)
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


def accelerate_load_state(
    accelerator: Accelerator,
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    accumulator: Any | None = None,
    strict: bool = True,
) -> str:
    """Resume from a checkpoint written by :func:`accelerate_save_state`: a local folder, a Hub repo id or an
    ``hf://USER/REPO[@REVISION]/SUBFOLDER`` URL (downloaded into the normal HF cache, by each node's main
    process first, then read from the cache by the others).

    Every process checks the model weight files (names and shapes) and loads the optimizer, scheduler and
    ``accumulator`` state with :func:`hf_optim.load_state` (which validates everything before changing
    anything), then lets ``accelerator.load_state`` restore RNG states, dataloader samplers, custom objects
    and its step counter. Model weights may come from a run with another number of processes. Returns the
    local checkpoint folder.
    """
    _check_checkpoint_support(accelerator, "accelerate_load_state")
    pairs = _optimizer_scheduler_pairs(accelerator)
    if accumulator is not None and not pairs:
        raise ValueError("accumulator: no prepared optimizer to load its state with")
    with accelerator.local_main_process_first():
        local_dir = _checkpoint_dir(path_or_repo_id, revision=revision, subfolder=subfolder, token=token)

    # 1. Check everything that can be checked before changing anything.
    weight_files = [
        _check_model_weights(accelerator, model, local_dir, index)
        for index, model in enumerate(accelerator._models)
    ]
    for index in range(len(pairs)):
        state_dir = _state_dir(local_dir, index)
        if not any(
            os.path.isfile(os.path.join(state_dir, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME)
        ):
            raise FileNotFoundError(
                f"path_or_repo_id: no hf_optim optimizer state ({OPTIMIZER_NAME}) in {state_dir!r}: expected a "
                "checkpoint written by hf_optim.accelerate_save_state (`hf-optim convert` converts Accelerate's)"
            )
    # 2. Optimizer / scheduler / accumulator: validated as a whole by load_state before it changes anything.
    for index, (optimizer, scheduler) in enumerate(pairs):
        load_state(
            _state_dir(local_dir, index),
            optimizer,
            scheduler,
            accumulator if index == 0 else None,
            strict=strict,
        )
    # 3. Models (already checked), RNG, samplers, custom objects, step: Accelerate.
    handle = accelerator.register_load_state_pre_hook(_load_weights_hook(accelerator, weight_files))
    try:
        with _without_optimizers_and_schedulers(accelerator):
            accelerator.load_state(local_dir)
    finally:
        handle.remove()
    logger.info("Loaded checkpoint from %s", local_dir)
    return local_dir


def _checkpoint_dir(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
) -> str:
    """The local checkpoint folder: a local path as is, else the whole folder downloaded from the Hub."""
    value = os.fspath(path_or_repo_id)
    if not _is_url(value) and os.path.exists(value):
        return resolve_state_dir(
            value, revision=revision, subfolder=subfolder, token=token
        )  # local folder checks
    return download_checkpoint(value, subfolder=subfolder, revision=revision, token=token)


def _check_checkpoint_support(accelerator: Accelerator, function: str) -> None:
    if accelerator.distributed_type in _SHARDED_STATE:
        raise NotImplementedError(
            f"{function} supports single-process and DDP runs; {accelerator.distributed_type} shards optimizer "
            "state, use accelerator.save_state / load_state there"
        )


def _state_dir(checkpoint_dir: str, index: int) -> str:
    return checkpoint_dir if index == 0 else os.path.join(checkpoint_dir, _EXTRA_OPTIMIZER_DIR.format(index))


def _optimizer_scheduler_pairs(accelerator: Accelerator) -> list[tuple[torch.optim.Optimizer, Any | None]]:
    """The prepared optimizers (unwrapped), each with the scheduler (unwrapped) that drives it, if any."""
    optimizers = [_unwrap_optimizer(opt) for opt in accelerator._optimizers]
    schedulers = [s.scheduler if isinstance(s, AcceleratedScheduler) else s for s in accelerator._schedulers]
    paired: list[Any | None] = [None] * len(optimizers)
    for scheduler in schedulers:
        target = getattr(scheduler, "optimizer", None)
        if isinstance(target, torch.optim.Optimizer):
            target = _unwrap_optimizer(target)
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
    for scheduler in accelerator._schedulers:
        if (
            isinstance(scheduler, AcceleratedScheduler)
            and _is_hf_optim_scheduler(scheduler.scheduler)
            and scheduler.step_with_optimizer
            and not scheduler.split_batches
        ):
            logger.warning(
                "An hf_optim scheduler is stepped %d times per optimizer step: prepare it with "
                "hf_optim.accelerate_prepare so the checkpoint counts optimizer steps",
                accelerator.num_processes,
            )


@contextlib.contextmanager
def _without_optimizers_and_schedulers(accelerator: Accelerator) -> Iterator[None]:
    """Hide the prepared optimizers and schedulers from ``save_state`` / ``load_state``.

    Accelerate has no switch to leave them out: ``save_state`` pickles them into ``optimizer.bin`` /
    ``scheduler.bin`` and ``load_state`` opens those files unconditionally. Emptying the two registries for the
    duration of the call keeps everything else Accelerate does (automatic naming and rotation, hooks, RNG,
    samplers, scaler, custom objects, its step counter) unchanged.
    """
    optimizers, schedulers = accelerator._optimizers, accelerator._schedulers
    accelerator._optimizers, accelerator._schedulers = [], []
    try:
        yield
    finally:
        accelerator._optimizers, accelerator._schedulers = optimizers, schedulers


def _bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _unwrapped_weights_hook(accelerator: Accelerator) -> Callable[[list[Any], list[Any], str], None]:
    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Accelerate saves DDP models under ``module.``-prefixed names; store the model's own names instead.
        for index, model in enumerate(models[: len(weights)]):
            weights[index] = _bare_model(accelerator, model).state_dict()

    return hook


def _weights_file(checkpoint_dir: str, index: int) -> str:
    suffix = f"_{index}" if index else ""
    return os.path.join(checkpoint_dir, f"{_MODEL_STEM}{suffix}.safetensors")


def _check_model_weights(
    accelerator: Accelerator, model: torch.nn.Module, checkpoint_dir: str, index: int
) -> str:
    """Check that the weights file of model ``index`` has exactly the model's tensors and shapes."""
    path = _weights_file(checkpoint_dir, index)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path_or_repo_id: model weights {path!r} not found")
    state = _bare_model(accelerator, model).state_dict()
    expected = {name: tuple(t.shape) for name, t in state.items()}
    try:
        with safe_open(path, framework="pt") as f:
            found = {_strip_wrapper_prefix(name): tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise ValueError(f"path_or_repo_id: cannot read model weights {path!r}: {err}") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    # Tied weights are stored once (safetensors refuses shared storage): a missing tensor that shares storage
    # with a stored one is restored through it.
    stored = {state[name].untyped_storage().data_ptr() for name in found if name in state}
    missing = [name for name in missing if state[name].untyped_storage().data_ptr() not in stored]
    if missing or unexpected:
        raise ValueError(
            f"path_or_repo_id: model weights {path!r} do not match model {index}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, shape in sorted(found.items()):
        if expected[name] != shape:
            raise ValueError(
                f"path_or_repo_id: model weights {path!r}: {name} has shape {list(shape)}, "
                f"the model expects {list(expected[name])}"
            )
    return path


def _strip_wrapper_prefix(name: str) -> str:
    # Checkpoints written by a plain accelerator.save_state under DDP / torch.compile carry wrapper prefixes.
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _load_weights_hook(accelerator: Accelerator, weight_files: list[str]) -> Callable[[list[Any], str], None]:
    def hook(models: list[Any], input_dir: str) -> None:
        for model, path in zip(accelerator._models, weight_files, strict=True):
            bare = _bare_model(accelerator, model)
            state = {_strip_wrapper_prefix(k): v for k, v in load_file(path).items()}
            bare.load_state_dict(state, strict=False)  # names were checked; strict=False allows tied weights
        models.clear()  # loaded here: keep Accelerate from loading them again with wrapper-prefixed names

    return hook
