"""Describing a checkpoint without a model: metadata, headers and the step counters (``hf-optim inspect``)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hf_optim.state import sharded, zero
from hf_optim.state.codec import TensorHeader, decode
from hf_optim.state.describe import FileReader
from hf_optim.state.format import dtype_name
from hf_optim.state.io import read_safetensors
from hf_optim.state.reader import Checkpoint, open_checkpoint

__all__ = ["StateInfo", "inspect_sharded_state", "inspect_state"]


@dataclass(frozen=True)
class StateInfo:
    """Summary of a checkpoint read from metadata and tensor headers only (``hf-optim inspect``).

    :func:`hf_optim.inspect_state` returns it: what a checkpoint holds, without a model, an optimizer or reading
    the tensors.

    Args:
        directory: The checkpoint's local directory.
        checkpoint_id: The checkpoint's id.
        format_version: The version of the file format (docs/FORMAT.md).
        optimizer_class: The saved optimizer's class (``module.QualName``).
        optimizer_name: Its registry name, if it has one.
        keyed_by: ``"name"`` (state keyed by parameter names) or ``"index"``.
        param_groups: Per group: number of parameters, elements and hyperparameters.
        num_params: Parameters with state.
        numel: Elements of those parameters.
        state_bytes: Bytes of the state tensors.
        files: The files of the checkpoint.
        step: (min, max) of the per-parameter step counters, if any.
        scheduler_name: The saved scheduler's registry name.
        scheduler_class: The saved scheduler's class.
        scheduler_step: The saved scheduler's ``last_epoch``.
        scheduler_lr: The saved scheduler's last learning rates.
        accumulator_bytes: Bytes of the saved accumulator's gradients.
        info: What the writer recorded about the checkpoint's origin (``hf-optim convert``).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 2)
        optimizer = hf_optim.AdamW(model.parameters())
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        hf_optim.save_state("ckpt", optimizer, model=model)
        info = hf_optim.inspect_state("ckpt")
        assert (info.num_params, info.numel, info.step) == (2, 6, (1.0, 1.0))
        ```
    """

    directory: str
    checkpoint_id: str
    format_version: int
    optimizer_class: str | None
    optimizer_name: str | None
    keyed_by: str
    param_groups: tuple[dict[str, Any], ...]  #: per group: num_params, numel, hyperparameters
    num_params: int
    numel: int
    state_bytes: int
    files: tuple[str, ...]
    step: tuple[float, float] | None  #: (min, max) of the per-parameter step counters
    scheduler_name: str | None = None
    scheduler_class: str | None = None
    scheduler_step: int | None = None
    scheduler_lr: tuple[float, ...] | None = None
    accumulator_bytes: int | None = None
    #: what the writer recorded about the checkpoint's origin (``hf-optim convert``: inferred values, gaps)
    info: dict[str, str] | None = None


def inspect_state(directory: str | os.PathLike[str], *, roots: Iterable[str] | None = None) -> StateInfo:
    """Describe a local checkpoint without a model or optimizer: reads metadata, headers and the step counters.

    ``hf_optim.inspect_state`` adds Hub repo ids and ``hf://`` URLs.
    """
    directory = os.fspath(directory)
    with open_checkpoint(directory, roots=roots) as ckpt:
        return _inspect(ckpt, directory)


def inspect_sharded_state(directory: str | os.PathLike[str]) -> sharded.ShardedStateInfo:
    """Describe a sharded checkpoint (FSDP2's boxes or DeepSpeed ZeRO's ranges), validated like a load:
    parameters and global shapes, groups, step counters, number of shards."""
    directory = os.fspath(directory)
    if zero.is_range_layout(directory):
        return zero.inspect_range_state(directory)
    return sharded.inspect_sharded_state(directory)


def _inspect(ckpt: Checkpoint, directory: str) -> StateInfo:
    meta = ckpt.meta
    groups = []
    total_params = total_numel = 0
    for group in meta["param_groups"]:
        numel = sum(_param_numel(rec, meta) for rec in group["params"])
        hyper = decode({"dict": group["hyperparameters"]}, PlaceholderTensors(ckpt.entries), "param group")
        groups.append({"num_params": len(group["params"]), "numel": numel, "hyperparameters": hyper})
        total_params += len(group["params"])
        total_numel += numel
    steps = [
        node["step"]
        for node in meta["state"].values()
        if isinstance(node.get("step"), dict) and "tensor" in node["step"]
    ]
    step_range = None
    if steps:
        values = ckpt.read_tensors({n["tensor"] for n in steps})
        nums = [float(v.reshape(-1)[0]) for v in values.values() if v.numel() == 1 and not v.is_complex()]
        if nums:
            step_range = (min(nums), max(nums))
    info: dict[str, Any] = {}
    files = list(ckpt.files)
    saved_scheduler = FileReader(ckpt).scheduler()
    if saved_scheduler is not None:
        state = saved_scheduler.state
        info["scheduler_name"] = saved_scheduler.name
        info["scheduler_class"] = saved_scheduler.class_name
        info["scheduler_step"] = state.get("last_epoch")
        last_lr = state.get("_last_lr")
        if isinstance(last_lr, list):
            info["scheduler_lr"] = tuple(last_lr)
    acc_file = ckpt.companion("accumulator")
    if acc_file is not None:
        st = read_safetensors(acc_file)
        info["accumulator_bytes"] = sum(e.nbytes for e in st.entries.values())
    return StateInfo(
        directory=directory,
        checkpoint_id=ckpt.checkpoint_id,
        format_version=meta["format_version"],
        optimizer_class=(meta.get("optimizer") or {}).get("class"),
        optimizer_name=(meta.get("optimizer") or {}).get("name"),
        keyed_by=meta["keyed_by"],
        param_groups=tuple(groups),
        num_params=total_params,
        numel=total_numel,
        state_bytes=sum(e.nbytes for e in ckpt.entries.values()),
        files=tuple(files),
        step=step_range,
        info=dict(meta["info"]) if meta.get("info") else None,
        **info,
    )


def _param_numel(record: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
    """A parameter's element count: its recorded shape, else (``convert`` without a model records none) that
    of its largest state tensor, which has the parameter's shape for every optimizer hf_optim knows."""
    if record.get("shape") is not None:
        return math.prod(record["shape"])
    key = record.get("name") if meta["keyed_by"] == "name" else str(record.get("index"))
    node = meta["state"].get(key) or {}
    shapes = [v["shape"] for v in node.values() if isinstance(v, dict) and "tensor" in v]
    return max((math.prod(shape) for shape in shapes), default=0)


class PlaceholderTensors(Mapping[str, Any]):
    """Stands in for tensors when decoding for display: ``<tensor float32 []>``."""

    def __init__(self, entries: Mapping[str, TensorHeader]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> Any:
        e = self._entries[key]
        return f"<tensor {dtype_name(e.dtype)} {list(e.shape)}>"

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - Mapping protocol
        return iter(self._entries)

    def __len__(self) -> int:  # pragma: no cover
        return len(self._entries)
