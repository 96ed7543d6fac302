"""Stock-DeepSpeed-like ZeRO-2 checkpoints written without DeepSpeed, for the convert attack table.

The files pickle the same globals DeepSpeed 0.19 does (its loss scaler, ``ZeroStageEnum``, ``fragment_address``)
through stand-in modules put in ``sys.modules`` only while saving. The layout is written out here from DeepSpeed's
rules (the group's parameters end to end in one flat buffer, padded to a multiple of 2 x world, each rank owning
an equal slice; the last rank's fp32 partition saved without its padding), so the control row also checks the
converter's arithmetic against an independent statement of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: the model: parameter name -> shape, one param group
SHAPES = {"a.weight": (3, 2), "a.bias": (3,)}
WORLD = 2
TOTAL = 9  # 6 + 3 elements
PARTITION = 6  # ceil(9 / (2 * WORLD)) * 2: the flat buffer is padded to 12
TAG = "global_step2"


def full(key: str) -> torch.Tensor:
    """The whole flat buffer of ``key`` (``exp_avg``, ``exp_avg_sq``, ``fp32``): distinct values per key."""
    base = {"exp_avg": 1.0, "exp_avg_sq": 100.0, "fp32": 1000.0}[key]
    return base + torch.arange(float(PARTITION * WORLD))


def expected(name: str, key: str) -> torch.Tensor:
    """What the converter must give for parameter ``name``: its elements of the flat buffer, in its shape."""
    start = 0 if name == "a.weight" else 6
    numel = 6 if name == "a.weight" else 3
    return full(key)[start : start + numel].view(SHAPES[name])


_MODULES = (
    "deepspeed",
    "deepspeed.runtime",
    "deepspeed.runtime.fp16",
    "deepspeed.runtime.fp16.loss_scaler",
    "deepspeed.runtime.zero",
    "deepspeed.runtime.zero.config",
    "deepspeed.utils",
    "deepspeed.utils.tensor_fragment",
)


class LossScaler:
    def __init__(self) -> None:
        self.cur_scale, self.dynamic = 1.0, False


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclasses.dataclass
class fragment_address:  # DeepSpeed's name
    numel: int
    start: int


@contextlib.contextmanager
def deepspeed_names() -> Iterator[dict[str, types.ModuleType]]:
    """Stand-in DeepSpeed modules holding the classes above under DeepSpeed's names, while saving."""
    saved = {name: sys.modules.get(name) for name in _MODULES}
    modules = {name: types.ModuleType(name) for name in _MODULES}
    for cls, module in (
        (LossScaler, "deepspeed.runtime.fp16.loss_scaler"),
        (ZeroStageEnum, "deepspeed.runtime.zero.config"),
        (fragment_address, "deepspeed.utils.tensor_fragment"),
    ):
        setattr(modules[module], cls.__name__, cls)
    originals = {cls: cls.__module__ for cls in (LossScaler, ZeroStageEnum, fragment_address)}
    for cls, module in zip(
        originals,
        (
            "deepspeed.runtime.fp16.loss_scaler",
            "deepspeed.runtime.zero.config",
            "deepspeed.utils.tensor_fragment",
        ),
        strict=True,
    ):
        cls.__module__ = module
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for cls, module in originals.items():
            cls.__module__ = module
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def model_states() -> dict[str, Any]:
    return {
        "module": OrderedDict((n, torch.zeros(s)) for n, s in SHAPES.items()),
        "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())],
        "frozen_param_shapes": OrderedDict(),
        "lr_scheduler": None,
        "global_steps": 2,
        "buffer_names": [],
    }


def optim_states(rank: int) -> dict[str, Any]:
    """Rank ``rank``'s ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` content."""
    low, high = rank * PARTITION, (rank + 1) * PARTITION
    lean = min(high, TOTAL) - low  # the last rank's fp32 partition is saved without its padding
    mappings = OrderedDict()
    offset = 0
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        first, last = max(offset, low), min(offset + numel, high)
        if last > first:
            mappings[name] = fragment_address(numel=last - first, start=first - low)
        offset += numel
    base = {
        "state": {
            0: {
                "step": torch.tensor(2.0),
                "exp_avg": full("exp_avg")[low:high].clone(),
                "exp_avg_sq": full("exp_avg_sq")[low:high].clone(),
            }
        },
        "param_groups": [
            {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}
        ],
    }
    return {
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(),
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": 0.0,
            "base_optimizer_state": base,
            "single_partition_of_fp32_groups": [full("fp32")[low : low + lean].clone()],
            "zero_stage": ZeroStageEnum.gradients,
            "group_paddings": [0 if rank < WORLD - 1 else PARTITION * WORLD - TOTAL],
            "partition_count": [WORLD],
            "ds_version": "0.19.8",
            "param_slice_mappings": [mappings],
        },
        "ds_config": {"train_batch_size": 2, "zero_optimization": {"stage": 2}},
        "ds_version": "0.19.8",
    }


def optim_file(folder: Path, rank: int) -> Path:
    return folder / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def write_checkpoint(folder: Path, *, model: dict | None = None, ranks: dict[int, Any] | None = None) -> None:
    """``folder/latest`` and ``folder/global_step2/``: the model states and every rank's optimizer states
    (``model`` / ``ranks[r]`` in place of the defaults; a rank given ``None`` is left out)."""
    (folder / TAG).mkdir(parents=True)
    (folder / "latest").write_text(TAG)
    ranks = ranks or {}
    with deepspeed_names():
        torch.save(
            model if model is not None else model_states(), folder / TAG / "mp_rank_00_model_states.pt"
        )
        for rank in range(WORLD):
            content = ranks.get(rank, optim_states(rank))
            if content is not None:
                torch.save(content, optim_file(folder, rank))
