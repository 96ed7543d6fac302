"""Where DeepSpeed ZeRO keeps each parameter's optimizer state on this process (duck-typed: no deepspeed import).

ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the parameters of group ``i`` are flattened, in order, into one buffer
(each at ``round_robin_bit16_offsets[i][j]``, padded at the end to a multiple of the world size); rank ``r`` owns
the elements ``[r * partition_size[i], (r + 1) * partition_size[i])`` of it, at arbitrary element offsets. Its
fp32 master copy is ``single_partition_of_fp32_groups[i]``, the one parameter the client optimizer sees in group
``i``: the client's state for the group (``exp_avg``, ...) is flat tensors of that size.

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): each parameter is partitioned by itself: with ``part =
ceil(numel / world)``, rank ``r`` owns its elements ``[r * part, min((r + 1) * part, numel))`` (``ds_tensor``,
padded to ``part``). The partitions of the parameters of sub-group ``s`` (group ``sub_group_to_group_id[s]``)
are concatenated into ``fp32_partitioned_groups_flat[s]``, the flat fp32 tensor the client's state is kept for.

A :class:`ZeroLayout` maps each parameter name to its piece here: (flat tensor, offset in it, offset in the
parameter's flattened elements, length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hf_optim._utils import unwrap_engine


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + length)`` of a flattened parameter, at ``local`` in flat tensor ``holder``."""

    holder: int
    local: int
    start: int
    length: int


@dataclass
class ZeroParam:
    name: str
    shape: tuple[int, ...]
    group: int
    holder: (
        int  # the flat partition it belongs to (on every process, whether or not this one holds any of it)
    )
    piece: Piece | None  # None: this process holds none of it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ZeroLayout:
    """This process's share of a ZeRO optimizer's state, by parameter name."""

    zero: Any  # the DeepSpeed ZeRO optimizer
    client: torch.optim.Optimizer  # the optimizer it steps (holds exp_avg, ...)
    stage: int
    rank: int
    world: int
    holders: list[torch.Tensor]  # the flat fp32 tensors (master weights) the client keeps state for
    holder_group: list[int]  # each holder's param group
    params: list[ZeroParam] = field(default_factory=list)
    model_dtype: torch.dtype = torch.float32

    @property
    def low_precision(self) -> bool:
        """Whether the model's weights are not the fp32 master weights (bf16 / fp16 training)."""
        return self.model_dtype != torch.float32

    def group_names(self) -> list[list[str]]:
        names: list[list[str]] = [[] for _ in self.client.param_groups]
        for p in self.params:
            names[p.group].append(p.name)
        return names


def _chain(obj: Any) -> list[Any]:
    out: list[Any] = []
    for _ in range(8):
        if obj is None or any(obj is o for o in out):
            break
        out.append(obj)
        obj = getattr(obj, "optimizer", None)
    return out


def _stage(obj: Any) -> int | None:
    if hasattr(obj, "fp32_partitioned_groups_flat") and hasattr(obj, "fp16_groups"):
        return 3
    if hasattr(obj, "single_partition_of_fp32_groups") and hasattr(obj, "round_robin_bit16_offsets"):
        return 2 if getattr(obj, "partition_gradients", False) else 1
    return None


def find_zero(optimizer: Any, model: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer behind ``optimizer`` (what ``deepspeed.initialize`` / ``accelerator.prepare``
    returned) or behind ``model`` (the engine, whose ``optimizer`` it is), else ``None``."""
    for start in (optimizer, getattr(model, "optimizer", None)):
        for obj in _chain(start):
            if _stage(obj) is not None:
                return obj
    return None


def zero_layout(zero: Any, model: torch.nn.Module) -> ZeroLayout:
    """The :class:`ZeroLayout` of ``zero`` on this process; names from ``model`` (the engine or its module)."""
    names = {id(p): name for name, p in unwrap_engine(model).named_parameters()}
    stage = _stage(zero)
    if stage is None:
        raise TypeError(f"{type(zero).__name__} is not a DeepSpeed ZeRO optimizer")
    client = zero.optimizer
    params: list[ZeroParam] = []

    def name_of(p: torch.Tensor) -> str:
        if id(p) not in names:
            raise ValueError(
                "the ZeRO optimizer has a parameter that is not in model: pass the engine as model="
            )
        return names[id(p)]

    if stage == 3:
        group = zero.dp_process_group
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        holders = list(zero.fp32_partitioned_groups_flat)
        holder_group = [zero.sub_group_to_group_id[s] for s in range(len(holders))]
        for s, sub in enumerate(zero.fp16_groups):
            local = 0
            for p in sub:
                numel, part = int(p.ds_numel), int(p.partition_numel())
                start, stop = rank * part, min((rank + 1) * part, numel)
                piece = Piece(s, local, start, stop - start) if stop > start else None
                params.append(ZeroParam(name_of(p), tuple(p.ds_shape), holder_group[s], s, piece))
                local += part
        dtype = zero.fp16_groups[0][0].dtype if zero.fp16_groups and zero.fp16_groups[0] else torch.float32
    else:
        holders = list(zero.single_partition_of_fp32_groups)
        holder_group = list(range(len(holders)))
        rank = world = 0
        for i, tensors in enumerate(zero.round_robin_bit16_groups):
            group = zero.real_dp_process_group[i]
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            size = int(zero.partition_size[i])
            low, high = rank * size, (rank + 1) * size
            by_param = {}
            for p, offset, meta in zip(
                tensors, zero.round_robin_bit16_offsets[i], zero.round_robin_bit16_meta[i], strict=True
            ):
                numel = meta.numel()
                first, last = max(offset, low), min(offset + numel, high)
                piece = Piece(i, first - low, first - offset, last - first) if last > first else None
                by_param[id(p)] = ZeroParam(name_of(p), tuple(meta.shape), i, i, piece)
            params.extend(by_param[id(p)] for p in zero.bit16_groups[i])  # the group's own order
        dtype = zero.bit16_groups[0][0].dtype if zero.bit16_groups and zero.bit16_groups[0] else torch.float32
    return ZeroLayout(zero, client, stage, rank, world, holders, holder_group, params, dtype)


def refresh_master_weights(layout: ZeroLayout) -> None:
    """Copy the model's weights into the fp32 master partitions (fp32 training: they are the same values)."""
    layout.zero._restore_from_bit16_weights()


#: the DeepSpeed engine's step counters (what ``engine.load_checkpoint`` restores besides the optimizer), saved
#: with its ZeRO state so that schedules keyed on them (curriculum, progressive layer drop, logging) resume too
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def engine_counters(engine: Any) -> dict[str, int] | None:
    """The engine's counters, or ``None`` when ``engine`` has none of them (not a DeepSpeed engine)."""
    counters = {
        key: value
        for key in ENGINE_COUNTERS
        if isinstance(value := getattr(engine, key, None), int) and not isinstance(value, bool)
    }
    return counters or None
