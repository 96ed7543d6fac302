"""``accelerator.prepare`` for hf_optim schedules: counted in optimizer steps on any number of processes."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler

__all__ = ["accelerate_prepare", "is_hf_optim_scheduler", "step_once_per_optimizer_step"]


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

    Args:
        accelerator: The run's ``Accelerator``.
        *objects: Models, optimizers, dataloaders and schedulers, as ``accelerator.prepare`` takes them.
        device_placement: Per object, whether to move it to the device (``accelerator.prepare``'s argument).

    Returns:
        The prepared object, or a tuple of them in the order given.

    Example:
        ```python
        import torch
        from accelerate import Accelerator
        import hf_optim

        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        optimizer = hf_optim.AdamW(model.parameters())
        scheduler = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=4)
        model, optimizer, scheduler = hf_optim.accelerate_prepare(accelerator, model, optimizer, scheduler)
        optimizer.step()
        scheduler.step()
        assert scheduler.scheduler.last_epoch == 1  # once per optimizer step, whatever the number of processes
        ```
    """
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, AcceleratedScheduler) and is_hf_optim_scheduler(obj.scheduler):
            step_once_per_optimizer_step(obj)
    return prepared


def is_hf_optim_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` was built by hf_optim (it carries its name and arguments in ``hf_optim_config``)."""
    return isinstance(getattr(scheduler, "hf_optim_config", None), dict)
