"""The sharded layout's reader (manifest -> checkpoint model; chunks through DCP), and inspection."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from hf_optim.errors import CheckpointError
from hf_optim.state.model import (
    SavedAccumulator,
    SavedCheckpoint,
    SavedGroup,
    SavedParam,
    SavedScheduler,
    TensorEntry,
)
from hf_optim.state.sharded._dist import agree, distributed, machine_union
from hf_optim.state.sharded._format import (
    ACCUMULATOR_PREFIX,
    RESERVED,
    SHARDED_MANIFEST_NAME,
    decode_value,
    saved_optimizer_class,
)
from hf_optim.state.sharded._read import (
    CheckedReader,
    Manifest,
    TensorPlan,
    close_manifest,
    needed_files,
    open_shards,
    read_manifest,
    read_manifest_doc,
    sharded_manifest_files,
)

logger = logging.getLogger(__name__)


class ShardedReader:
    """Reader of a sharded checkpoint (the checkpoint model's :class:`~hf_optim.state.model.Reader`): the
    manifest decoded, then each process's chunks read through ``torch.distributed.checkpoint``, only from the
    shard files and byte ranges it needs. A context manager: it closes the shard files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, SHARDED_MANIFEST_NAME)
        self.manifest: Manifest | None = None

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        close_manifest(self.manifest)

    def describe(self) -> SavedCheckpoint:
        manifest = self.manifest = read_manifest(self.directory, open_all=False)
        path, doc = self.path, manifest.doc
        groups_doc = doc.get("param_groups")
        if not isinstance(groups_doc, list):
            raise CheckpointError(f"{path}: 'param_groups' must be a list")
        state_doc = doc["state"]
        groups: list[SavedGroup] = []
        seen: set[str] = set()
        for g, saved in enumerate(groups_doc):
            where = f"{path}: param_groups[{g}]"
            if (
                not isinstance(saved, dict)
                or set(saved) != {"params", "hyperparameters"}
                or not isinstance(saved["params"], list)
                or not all(isinstance(n, str) for n in saved["params"])
            ):
                raise CheckpointError(f"{where} is malformed")
            hyper = decode_value(saved["hyperparameters"], where)
            if not isinstance(hyper, dict) or RESERVED & set(hyper):
                raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
            params = []
            for name in saved["params"]:
                if name in seen:
                    raise CheckpointError(f"{where}: parameter {name[:200]!r} is listed twice")
                seen.add(name)
                record = state_doc.get(name)
                state = (
                    None
                    if record is None
                    else {k: self._entry(name, k, entry) for k, entry in record.items()}
                )
                params.append(SavedParam(key=name, name=name, state=state))
            groups.append(SavedGroup(hyper, params))
        stray = sorted(set(state_doc) - seen)
        if stray:
            raise CheckpointError(f"{path}: state for {stray[0][:200]!r}, which is in no param group")
        return SavedCheckpoint(
            source=path,
            directory=self.directory,
            checkpoint_id=manifest.checkpoint_id,
            optimizer_class=saved_optimizer_class(doc),
            keyed_by="name",
            groups=groups,
            scheduler=self.scheduler,
            accumulator=self.accumulator,
            laid_out_like=tuple(
                TensorEntry(plan.key, plan.shape, plan.dtype, plan.chunks, like=plan.name)
                for key, plan in manifest.tensors.items()
                if key.startswith(ACCUMULATOR_PREFIX)
            ),
            scheduler_label="scheduler state",
            accumulator_label="accumulator state",
        )

    def _entry(self, name: str, key: str, entry: dict[str, Any]) -> Any:
        where = f"{self.path}: state[{name[:200]!r}][{key[:200]!r}]"
        if "value" in entry:
            return decode_value(entry["value"], where)
        assert self.manifest is not None
        plan = self.manifest.tensors[entry["sharded"]]
        return TensorEntry(plan.key, plan.shape, plan.dtype, plan.chunks, like=name)

    def scheduler(self) -> SavedScheduler | None:
        saved = self.manifest.doc.get("scheduler") if self.manifest is not None else None
        if saved is None:
            return None
        if not isinstance(saved, dict) or "state_dict" not in saved:
            raise CheckpointError(f"{self.path}: 'scheduler' is malformed")
        state = decode_value(saved["state_dict"], f"{self.path}: scheduler")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: the scheduler state is not a dictionary")
        config = saved.get("config")
        name = (
            config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else None
        )
        cls = saved.get("class") if isinstance(saved.get("class"), str) else None
        kwargs = config.get("kwargs") if name is not None and isinstance(config, dict) else None
        return SavedScheduler(f"{self.path} (scheduler)", state, cls, name, kwargs)

    def accumulator(self) -> SavedAccumulator | None:
        manifest = self.manifest
        saved = manifest.doc.get("accumulator") if manifest is not None else None
        if manifest is None or saved is None:
            return None
        where = f"{self.path} (accumulator)"
        rest = decode_value(saved.get("state"), where)
        if not isinstance(rest, dict) or "gradients" in rest:
            raise CheckpointError(f"{where}: the accumulator state must be an object without 'gradients'")
        gradients: list[TensorEntry | None] = []
        for i, entry in enumerate(saved["gradients"]):
            plan = None if entry is None else manifest.tensors[f"{ACCUMULATOR_PREFIX}{i}"]
            gradients.append(
                None
                if plan is None
                else TensorEntry(plan.key, plan.shape, plan.dtype, plan.chunks, like=plan.name)
            )
        cls = saved.get("class") if isinstance(saved.get("class"), str) else None
        return SavedAccumulator(where, {**rest, "gradients": gradients}, cls)

    def prepare(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> None:
        """Open the shard files holding this process's chunks and check their headers against the manifest."""
        manifest = self.manifest
        assert manifest is not None
        for key, (entry, like) in entries.items():
            if like is None or tuple(like.shape) != entry.shape:
                raise CheckpointError(f"{self.path}: {key} is not laid out like a parameter of the model")
        open_shards(
            manifest,
            needed_files(manifest, {key: like for key, (_, like) in entries.items() if like is not None}),
        )

    def read(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Each entry into a tensor laid out like its live tensor (checked by :meth:`prepare`)."""
        manifest = self.manifest
        assert manifest is not None
        targets = {
            key: torch.empty_like(like.detach(), dtype=entry.dtype)
            for key, (entry, like) in entries.items()
            if like is not None
        }
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():
                # one process without a process group: DCP warns that it "assumes" exactly that
                warnings.filterwarnings(
                    "ignore", message="torch.distributed is disabled", category=UserWarning
                )
                dcp.load(dict(targets), storage_reader=CheckedReader(manifest), no_dist=not distributed())
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # DCP wraps any rank's failure in a BaseException
            raise CheckpointError(
                f"{manifest.shard_dir}: reading the shards failed ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        if read_manifest_doc(self.directory).get("checkpoint_id") != manifest.checkpoint_id:
            raise CheckpointError(f"{self.directory}: the checkpoint changed while loading")
        return targets


def _layouts(
    plans: Mapping[str, TensorPlan], model_params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each sharded tensor's key -> the parameter laid out like it (its shape and placement: what to read)."""
    return {key: model_params[plan.name] for key, plan in plans.items()}


def machine_files(manifest_path: str, model: torch.nn.Module) -> list[str]:
    """The files of a sharded checkpoint the processes on this machine read (relative paths, the manifest
    first), for downloading only those; every file when the manifest does not say where each chunk is, or does
    not fit the model (the load then says why). A collective: call it on every process."""
    directory = os.path.dirname(manifest_path)
    error = listed = None
    try:
        listed = sharded_manifest_files(manifest_path)
    except CheckpointError as exc:
        error = str(exc)
    error = agree(error)
    if error is not None or listed is None:
        raise CheckpointError(error or "another process could not read the manifest")
    folder = os.path.dirname(listed[-1])
    mine: set[str] | None = None
    manifest = None
    try:
        manifest = read_manifest(directory, open_all=False)
        if manifest.mapped:
            mine = needed_files(manifest, _layouts(manifest.tensors, dict(model.named_parameters())))
    except Exception:  # only chooses what to download: the load itself reports the problem, on every rank
        mine = None
    finally:
        close_manifest(manifest)
    names = [os.path.basename(f) for f in listed[1:]]
    wanted = machine_union([mine is None or name in mine for name in names])
    return [listed[0], *(f"{folder}/{name}" for name, want in zip(names, wanted, strict=True) if want)]


# ---------------------------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedStateInfo:
    """What a sharded checkpoint holds, read without torch.distributed or a model.

    :func:`hf_optim.inspect_state` returns it for a sharded (FSDP2 or DeepSpeed ZeRO) checkpoint, after
    validating the manifest and every shard header as a load would.

    Args:
        directory: The checkpoint's local directory.
        checkpoint_id: The checkpoint's id.
        optimizer_class: The saved optimizer's class.
        world_size: The number of processes that saved it.
        num_shards: The number of shard files.
        parameters: Parameter name -> state key -> global shape.
        has_scheduler: Whether a scheduler's state was saved.
        accumulator_gradients: The saved accumulator's number of gradients (``None``: no accumulator).
        param_groups: Per group: number of parameters, elements and hyperparameters.
        step: (min, max) of the per-parameter step counters, if any.
        scheduler_name: The saved scheduler's registry name.
        scheduler_class: The saved scheduler's class.
        scheduler_step: The saved scheduler's ``last_epoch``.
        scheduler_lr: The saved scheduler's last learning rates.
        info: Where a converted checkpoint came from and what was inferred (``None`` for a saved one).

    Example:
        <!-- skip: needs a sharded checkpoint, written by several FSDP2 processes (see the FSDP2 page) -->
        ```python
        import hf_optim

        info = hf_optim.inspect_state("sharded-ckpt")
        print(info.world_size, info.num_shards, sorted(info.parameters))
        ```
    """

    directory: str
    checkpoint_id: str
    optimizer_class: str | None
    world_size: int | None
    num_shards: int
    parameters: dict[str, dict[str, tuple[int, ...]]]  # name -> state key -> global shape
    has_scheduler: bool
    #: the saved accumulator's gradients: how many (``None`` where it held none), or None without an accumulator
    accumulator_gradients: int | None = None
    param_groups: tuple[dict[str, Any], ...] = ()  #: per group: num_params, numel, hyperparameters
    step: tuple[float, float] | None = None  #: (min, max) of the per-parameter step counters
    scheduler_name: str | None = None
    scheduler_class: str | None = None
    scheduler_step: int | None = None
    scheduler_lr: tuple[float, ...] | None = None
    info: dict[str, str] | None = None


def inspect_sharded_state(directory: str | os.PathLike[str]) -> ShardedStateInfo:
    """Describe a sharded checkpoint (validated like a load): parameters, global shapes, number of shards."""
    manifest = read_manifest(os.fspath(directory))
    close_manifest(manifest)
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, plan in manifest.tensors.items():
        if key.startswith(ACCUMULATOR_PREFIX):
            continue
        params.setdefault(plan.name, {})[plan.state_key] = plan.shape
    # groups, step counters (saved in the manifest) and the scheduler
    with ShardedReader(os.fspath(directory)) as reader:
        saved = reader.describe()
        scheduler = saved.scheduler()
        groups, steps = [], []
        for group in saved.groups:
            numel = 0
            for param in group.params:
                entries = [v for v in (param.state or {}).values() if isinstance(v, TensorEntry)]
                numel += max((math.prod(e.shape) for e in entries), default=0)
                step = (param.state or {}).get("step")
                if (isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex()) or (
                    isinstance(step, (int, float)) and not isinstance(step, bool)
                ):
                    steps.append(float(step))
            hyper = group.hyperparameters
            groups.append({"num_params": len(group.params), "numel": numel, "hyperparameters": hyper})
    last_lr = scheduler.state.get("_last_lr") if scheduler is not None else None
    last_epoch = scheduler.state.get("last_epoch") if scheduler is not None else None
    world = manifest.doc.get("world_size")
    return ShardedStateInfo(
        directory=manifest.directory,
        checkpoint_id=manifest.checkpoint_id,
        optimizer_class=saved_optimizer_class(manifest.doc),
        world_size=world if isinstance(world, int) and not isinstance(world, bool) else None,
        num_shards=len(manifest.doc["shards"]["files"]),
        parameters=params,
        has_scheduler=isinstance(manifest.doc.get("scheduler"), dict),
        accumulator_gradients=len(manifest.doc["accumulator"]["gradients"])
        if manifest.doc.get("accumulator") is not None
        else None,
        param_groups=tuple(groups),
        step=(min(steps), max(steps)) if steps else None,
        scheduler_name=scheduler.name if scheduler is not None else None,
        scheduler_class=scheduler.class_name if scheduler is not None else None,
        scheduler_step=last_epoch if isinstance(last_epoch, int) else None,
        scheduler_lr=tuple(last_lr) if isinstance(last_lr, list) else None,
    )
