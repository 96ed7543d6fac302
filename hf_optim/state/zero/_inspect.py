"""Describing a range-partitioned checkpoint (format version 3) without a model or torch.distributed."""

from __future__ import annotations

import math

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.model import TensorEntry
from hf_optim.state.sharded import ShardedStateInfo
from hf_optim.state.zero._read import open_files
from hf_optim.state.zero._reader import RangeReader

__all__ = ["inspect_range_state"]


def inspect_range_state(directory: str) -> ShardedStateInfo:
    """What a ZeRO checkpoint holds (parameters and global shapes, groups, step counters, scheduler, where it came
    from), validated as a load would: the manifest, and every partition file's header."""
    with RangeReader(directory) as reader:
        saved = reader.describe()
        plan = reader.plan
        assert plan is not None
        open_files(plan, plan.files)
        params: dict[str, dict[str, tuple[int, ...]]] = {}
        groups, steps = [], []
        for group in saved.groups:
            numel = 0
            for param in group.params:
                state = param.state or {}
                shapes = {k: v.shape for k, v in state.items() if isinstance(v, TensorEntry)}
                if shapes:
                    params[param.name or param.key] = shapes
                numel += max((math.prod(s) for s in shapes.values()), default=0)
                step = state.get("step")
                if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
                    steps.append(float(step))
            groups.append(
                {"num_params": len(group.params), "numel": numel, "hyperparameters": group.hyperparameters}
            )
        scheduler = saved.scheduler()
    doc = plan.doc
    info = doc.get("info")
    if info is not None and not (
        isinstance(info, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())
    ):
        raise CheckpointError(f"{plan.path}: 'info' must map strings to strings")
    last_lr = scheduler.state.get("_last_lr") if scheduler is not None else None
    last_epoch = scheduler.state.get("last_epoch") if scheduler is not None else None
    world = doc.get("world_size")
    return ShardedStateInfo(
        directory=directory,
        checkpoint_id=plan.checkpoint_id,
        optimizer_class=saved.optimizer_class,
        world_size=world if isinstance(world, int) and not isinstance(world, bool) else None,
        num_shards=len(plan.files),
        parameters=params,
        has_scheduler=scheduler is not None,
        param_groups=tuple(groups),
        step=(min(steps), max(steps)) if steps else None,
        scheduler_name=scheduler.name if scheduler is not None else None,
        scheduler_class=scheduler.class_name if scheduler is not None else None,
        scheduler_step=last_epoch
        if isinstance(last_epoch, int) and not isinstance(last_epoch, bool)
        else None,
        scheduler_lr=tuple(float(v) for v in last_lr)
        if isinstance(last_lr, list) and all(isinstance(v, int | float) for v in last_lr)
        else None,
        info=dict(info) if info else None,
    )
