"""Consolidating a sharded checkpoint in one process, without torch.distributed, one full tensor at a time.

:func:`open_consolidation` reads the checked manifest (``read_manifest``: validated plan, every shard header
checked, the files kept open) and describes the checkpoint as a torch-format optimizer state dict whose sharded
tensors are ``meta``-device placeholders (their dtype and global shape). :meth:`ConsolidationSource.full_tensor`
assembles one of them from its chunks, read through the descriptors whose headers were checked, when the
writer needs it; the writer drops it once written. The writing itself is ``hf_optim.state.consolidate_state``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.io import read_region, read_safetensors
from hf_optim.state.sharded._format import (
    ACCUMULATOR_PREFIX,
    RESERVED,
    SHARDED_MANIFEST_NAME,
    decode_value,
    saved_optimizer_class,
)
from hf_optim.state.sharded._read import Manifest, TensorPlan, close_manifest, read_manifest

#: bytes of a shard read at once while assembling a tensor (a chunk larger than this is read in row blocks)
READ_BUFFER_SIZE = 16 << 20


@dataclass
class ConsolidationSource:
    """A sharded checkpoint as one torch-format optimizer state dict, its tensors built on demand.

    ``state_dict["state"]`` holds ``meta``-device placeholders for the sharded tensors (dtype and global shape)
    and the decoded values of the rest; :meth:`full_tensor` builds a placeholder's tensor. Close it (or use it
    as a context manager) to release the shard files.
    """

    state_dict: dict[str, Any]
    param_shapes: list[list[list[int] | None]]
    optimizer_class: str | None
    scheduler_state: dict[str, Any] | None
    scheduler_class: str | None
    scheduler_name: str | None
    scheduler_kwargs: Any
    manifest: Manifest
    read_buffer_size: int = READ_BUFFER_SIZE
    plans: dict[tuple[int, str], TensorPlan] = field(default_factory=dict)
    #: the saved accumulator: its class and state with ``meta`` placeholders for the gradients, or None
    accumulator_class: str | None = None
    accumulator_state: dict[str, Any] | None = None
    gradient_plans: dict[int, TensorPlan] = field(default_factory=dict)

    def full_tensor(self, index: int, state_key: str) -> torch.Tensor:
        """The full tensor of parameter ``index``'s state ``state_key``, assembled from its chunks."""
        return self._assemble(self.plans[(index, state_key)])

    def full_gradient(self, position: int) -> torch.Tensor:
        """The accumulator's full gradient ``position``, assembled from its chunks."""
        return self._assemble(self.gradient_plans[position])

    def _assemble(self, plan: TensorPlan) -> torch.Tensor:
        """``plan``'s tensor from its chunks, each read in blocks of at most ``read_buffer_size`` bytes (or one
        row when a row is larger), only the blocks' bytes."""
        tensor = torch.empty(plan.shape, dtype=plan.dtype)
        for chunk in plan.chunks:
            shard = read_safetensors(self.manifest.files[chunk.file])
            if not chunk.sizes:  # a 0-dim tensor is one chunk
                tensor.copy_(read_region(shard, plan.key, (), ()))
                continue
            row_bytes = math.prod(chunk.sizes[1:]) * plan.dtype.itemsize
            rows = max(1, self.read_buffer_size // max(1, row_bytes))
            inner = tuple(slice(o, o + n) for o, n in zip(chunk.offsets[1:], chunk.sizes[1:], strict=True))
            for start in range(0, chunk.sizes[0], rows):
                stop = min(chunk.sizes[0], start + rows)
                block = read_region(
                    shard, plan.key, (start, *(0,) * len(inner)), (stop - start, *chunk.sizes[1:])
                )
                tensor[(slice(chunk.offsets[0] + start, chunk.offsets[0] + stop), *inner)] = block
        return tensor

    def close(self) -> None:
        close_manifest(self.manifest)

    def __enter__(self) -> ConsolidationSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_consolidation(
    directory: str | os.PathLike[str], *, read_buffer_size: int = READ_BUFFER_SIZE
) -> ConsolidationSource:
    """Read and check a sharded checkpoint's manifest and shard headers (as a load does) and describe it as one
    optimizer state dict whose sharded tensors are built on demand; nothing of the tensors is read yet."""
    if not isinstance(read_buffer_size, int) or read_buffer_size < 1:
        raise ValueError(f"read_buffer_size must be a positive int, got {read_buffer_size!r}")
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    try:
        return _describe(manifest, read_buffer_size)
    except BaseException:
        close_manifest(manifest)
        raise


def _describe(manifest: Manifest, read_buffer_size: int) -> ConsolidationSource:
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    doc = manifest.doc
    groups, shapes, state = [], [], {}
    plans: dict[tuple[int, str], TensorPlan] = {}
    seen: set[str] = set()
    index = 0
    for g, saved in enumerate(doc.get("param_groups") or []):
        where = f"{path}: param_groups[{g}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise CheckpointError(f"{where} is malformed")
        hyper = decode_value(saved.get("hyperparameters"), where)
        if not isinstance(hyper, dict) or RESERVED & set(hyper):
            raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
        names = saved["params"]
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: parameter names must be strings")
        if seen & set(names) or len(set(names)) != len(names):
            raise CheckpointError(f"{where}: a parameter is listed twice")
        seen.update(names)
        groups.append({**hyper, "params": list(range(index, index + len(names))), "param_names": list(names)})
        group_shapes: list[list[int] | None] = []
        for name in names:
            entries: dict[str, Any] = {}
            shape = None
            for key, entry in (doc["state"].get(name) or {}).items():
                if "sharded" in entry:
                    plan = manifest.tensors[entry["sharded"]]
                    entries[key] = torch.empty(plan.shape, dtype=plan.dtype, device="meta")
                    plans[(index, key)] = plan
                    shape = list(plan.shape)
                else:
                    entries[key] = decode_value(entry["value"], f"{path}: state[{name!r}][{key!r}]")
            if entries:
                state[index] = entries
            group_shapes.append(shape)
            index += 1
        shapes.append(group_shapes)
    orphans = sorted(set(doc["state"]) - seen)
    if orphans:
        raise CheckpointError(f"{path}: state for {orphans[0]!r}, which is in no param group")
    sched = doc.get("scheduler") if isinstance(doc.get("scheduler"), dict) else None
    if sched is not None and "state_dict" not in sched:
        raise CheckpointError(f"{path}: the scheduler has no state_dict")
    config = sched.get("config") if sched is not None and isinstance(sched.get("config"), dict) else {}
    accumulator_state, gradient_plans = None, {}
    saved_acc = doc.get("accumulator")
    acc_class = saved_acc.get("class") if saved_acc is not None else None
    if saved_acc is not None:
        accumulator_state = decode_value(saved_acc.get("state"), f"{path}: accumulator")
        if not isinstance(accumulator_state, dict) or "gradients" in accumulator_state:
            raise CheckpointError(f"{path}: the accumulator state must be an object without 'gradients'")
        gradients: list[torch.Tensor | None] = []
        for i, entry in enumerate(saved_acc["gradients"]):
            grad_plan = manifest.tensors[f"{ACCUMULATOR_PREFIX}{i}"] if entry is not None else None
            if grad_plan is not None:
                gradient_plans[i] = grad_plan
            gradients.append(
                torch.empty(grad_plan.shape, dtype=grad_plan.dtype, device="meta") if grad_plan else None
            )
        accumulator_state["gradients"] = gradients
    return ConsolidationSource(
        state_dict={"state": state, "param_groups": groups},
        param_shapes=shapes,
        optimizer_class=saved_optimizer_class(doc),
        scheduler_state=decode_value(sched["state_dict"], f"{path}: scheduler")
        if sched is not None
        else None,
        scheduler_class=sched.get("class")
        if sched is not None and isinstance(sched.get("class"), str)
        else None,
        scheduler_name=config.get("name") if isinstance(config.get("name"), str) else None,
        scheduler_kwargs=config.get("kwargs") if isinstance(config.get("kwargs"), dict) else None,
        manifest=manifest,
        read_buffer_size=read_buffer_size,
        plans=plans,
        accumulator_class=acc_class if isinstance(acc_class, str) else None,
        accumulator_state=accumulator_state,
        gradient_plans=gradient_plans,
    )
