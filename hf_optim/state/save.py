"""Writing checkpoints: ``save_state`` (live objects), ``save_state_dict`` (a torch-format state dict) and
``save_object_state`` (one value tree in one file)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from hf_optim import registry
from hf_optim._utils import unwrap_optimizer, unwrap_scheduler
from hf_optim.state import sharded, zero
from hf_optim.state.atomic import PendingFile, commit, new_checkpoint_id, save_lock
from hf_optim.state.codec import Encoder
from hf_optim.state.format import (
    ACCUMULATOR_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    FORMAT_VERSION,
    KIND_ACCUMULATOR,
    KIND_OBJECT,
    KIND_OPTIMIZER,
    KIND_SCHEDULER,
    KIND_SHARD,
    METADATA_KEY,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    dtype_name,
    parse_max_shard_size,
    qualname,
)
from hf_optim.state.io import write_json, write_safetensors, write_safetensors_streaming

logger = logging.getLogger(__name__)

__all__ = ["save_object_state", "save_state", "save_state_dict"]


@dataclass
class _ParamRecord:
    index: int
    name: str | None
    shape: list[int] | None
    dtype: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "shape": self.shape, "dtype": self.dtype}
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class _Payload:
    """What a checkpoint holds before it is written: the optimizer's tensors (by file key) and JSON metadata,
    the scheduler's document, the accumulator's tensors and metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    scheduler_doc: dict[str, Any] | None = None
    accumulator: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    #: file key of each optimizer state tensor -> (parameter index, state key) in the state dict
    origins: dict[str, tuple[int, str]] = field(default_factory=dict)


def _optimizer_payload(
    state_dict: Mapping[str, Any],
    params: Sequence[Sequence[_ParamRecord]],
    *,
    optimizer_class: str | None,
    optimizer_name: str | None,
) -> _Payload:
    """Flatten an optimizer ``state_dict`` into tensors + the JSON metadata (docs/FORMAT.md)."""
    groups = state_dict["param_groups"]
    all_records = [r for group in params for r in group]
    names = [r.name for r in all_records]
    keyed_by = "name" if all_records and all(n is not None for n in names) else "index"
    if keyed_by == "name" and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        logger.warning("parameter name %r appears twice; keying the optimizer state by index instead", dup)
        keyed_by = "index"
    key_of = {
        r.index: (r.name if keyed_by == "name" and r.name is not None else str(r.index)) for r in all_records
    }

    enc = Encoder()
    group_meta = []
    for g, (group, records) in enumerate(zip(groups, params, strict=True)):
        hyper = {}
        for k, v in group.items():
            if k in ("params", "param_names"):
                continue
            if not isinstance(k, str):
                raise ValueError(f"param group {g}: hyperparameter names must be strings, got {k!r}")
            if k in ("state", "param_groups"):
                raise ValueError(f"param group {g}: {k!r} is reserved and cannot be a hyperparameter")
            hyper[k] = enc.encode(v, f"param_groups.{g}.{k}", f"param group {g} hyperparameter {k!r}")
        group_meta.append({"params": [r.to_json() for r in records], "hyperparameters": hyper})

    state_meta: dict[str, Any] = {}
    origins: dict[str, tuple[int, str]] = {}
    for index, pstate in state_dict["state"].items():
        if index not in key_of:
            raise ValueError(f"optimizer state has an entry {index!r} that belongs to no parameter group")
        pkey = key_of[index]
        where = f"state of parameter {pkey!r}"
        if not isinstance(pstate, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(pstate).__name__}")
        node = {}
        for k, v in pstate.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: state keys must be strings, got {k!r}")
            node[k] = enc.encode(v, f"state.{pkey}.{k}", f"{where}, key {k!r}", numbers_as_tensors=True)
            if isinstance(v, torch.Tensor):
                origins[f"state.{pkey}.{k}"] = (index, k)
        state_meta[pkey] = node

    extra = {}
    for k, v in state_dict.items():
        if k in ("state", "param_groups"):
            continue
        if not isinstance(k, str):
            raise ValueError(f"optimizer.state_dict() has a non-string top-level key {k!r}")
        if k in ("params", "param_names"):
            raise ValueError(f"optimizer.state_dict() has a top-level key {k!r}, which is reserved")
        extra[k] = enc.encode(v, f"extra.{k}", f"optimizer.state_dict()[{k!r}]")

    meta = {
        "format": KIND_OPTIMIZER,
        "format_version": FORMAT_VERSION,
        "optimizer": {"class": optimizer_class, "name": optimizer_name},
        "keyed_by": keyed_by,
        "param_groups": group_meta,
        "state": state_meta,
        "extra": extra,
        "versions": {"hf_optim": _version(), "torch": torch.__version__},
    }
    return _Payload(enc.tensors, meta, origins=origins)


def _version() -> str:
    from hf_optim import __version__  # the one version source (pyproject reads it too)

    return __version__


def _scheduler_document(
    state: Mapping[str, Any], class_name: str | None, name: str | None, kwargs: Any
) -> dict[str, Any]:
    """The content of ``scheduler.json`` (without the checkpoint id) for a scheduler ``state_dict``."""
    enc = Encoder()
    state_node = enc.encode(state, "state", "scheduler.state_dict()")
    kwargs_node = enc.encode(kwargs, "kwargs", "scheduler.hf_optim_config['kwargs']")
    if enc.tensors:
        raise ValueError(
            f"scheduler.state_dict() holds tensors ({', '.join(enc.tensors)}); scheduler.json stores JSON only"
        )
    return {
        "format": KIND_SCHEDULER,
        "format_version": FORMAT_VERSION,
        "class": class_name,
        "name": name,
        "kwargs": kwargs_node,
        "state_dict": state_node,
    }


def _records(
    state_dict: Mapping[str, Any],
    shapes: Sequence[Sequence[Sequence[int] | None]] | None,
    dtypes: Sequence[Sequence[torch.dtype | None]] | None,
) -> list[list[_ParamRecord]]:
    out = []
    for g, group in enumerate(state_dict["param_groups"]):
        names = group.get("param_names")
        records = []
        for j, index in enumerate(group["params"]):
            name = names[j] if names is not None and j < len(names) else None
            shape = shapes[g][j] if shapes is not None else None
            dtype = dtypes[g][j] if dtypes is not None else None
            records.append(
                _ParamRecord(
                    int(index),
                    name,
                    [int(d) for d in shape] if shape is not None else None,
                    dtype_name(dtype) if dtype is not None else None,
                )
            )
        out.append(records)
    return out


def save_state_dict(
    save_directory: str | os.PathLike[str],
    state_dict: Mapping[str, Any],
    *,
    param_shapes: Sequence[Sequence[Sequence[int] | None]] | None = None,
    param_dtypes: Sequence[Sequence[torch.dtype | None]] | None = None,
    optimizer_class: str | None = None,
    optimizer_name: str | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    scheduler_class: str | None = None,
    scheduler_name: str | None = None,
    scheduler_kwargs: Any = None,
    accumulator_state: Mapping[str, Any] | None = None,
    accumulator_class: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = False,
) -> list[str]:
    """Save a torch-format optimizer ``state_dict`` (``{"state", "param_groups"}``) as an hf_optim checkpoint.

    The lower layer of :func:`save_state` and of ``hf-optim convert``. Parameter names come from the groups'
    ``param_names`` (torch keeps them for named parameters); ``param_shapes`` / ``param_dtypes`` (group by group)
    are recorded so that loading can check them. ``metadata`` (str -> str) is stored as the checkpoint's ``info``.
    Use it for state that exists only as a dict (a converted ``optimizer.pt``, another framework's export).

    Args:
        save_directory: The folder to write into (created if needed).
        state_dict: The optimizer's ``state_dict()``.
        param_shapes: Per group, per parameter: its shape (``None``: unknown), checked on load.
        param_dtypes: Per group, per parameter: its dtype (``None``: unknown), checked on load.
        optimizer_class: The optimizer's class (``module.QualName``), recorded.
        optimizer_name: Its registry name, recorded.
        scheduler_state: A scheduler's ``state_dict()`` to save alongside.
        scheduler_class: The scheduler's class, recorded.
        scheduler_name: The scheduler's registry name, recorded.
        scheduler_kwargs: The scheduler's arguments (its ``hf_optim_config["kwargs"]``), recorded.
        accumulator_state: A :class:`GradientAccumulator`'s ``state_dict()`` to save alongside.
        accumulator_class: The accumulator's class, recorded.
        max_shard_size: Split the state into files of at most this size (``"5GB"``, or bytes).
        metadata: Free-form str -> str information, stored as the checkpoint's ``info``.
        fsync: Flush the files and the folder to disk before returning.

    Returns:
        The paths written.

    Raises:
        TypeError: If a value of the state cannot be stored (only tensors, numbers, str, None and containers).
        ValueError: If ``state_dict`` is not in torch's optimizer format, or the arguments disagree with it.
        OSError: If writing fails (the previous checkpoint in the folder is left as it was).

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        hf_optim.save_state_dict("ckpt", optimizer.state_dict(), optimizer_class="torch.optim.SGD")
        assert hf_optim.load_state_dict("ckpt")["param_groups"][0]["momentum"] == 0.9
        ```
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must have 'state' and 'param_groups' (torch's optimizer format)")
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("metadata must map str to str")
    directory = _target_directory(save_directory)
    shard_size = parse_max_shard_size(max_shard_size)
    payload = _state_dict_payload(
        state_dict,
        param_shapes=param_shapes,
        param_dtypes=param_dtypes,
        optimizer_class=optimizer_class,
        optimizer_name=optimizer_name,
        scheduler_state=scheduler_state,
        scheduler_class=scheduler_class,
        scheduler_name=scheduler_name,
        scheduler_kwargs=scheduler_kwargs,
        accumulator_state=accumulator_state,
        accumulator_class=accumulator_class,
        metadata=metadata,
    )
    return _save_payload(directory, payload, shard_size, fsync)


def _target_directory(save_directory: str | os.PathLike[str]) -> str:
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_directory {directory!r} exists and is not a directory")
    return directory


def _state_dict_payload(
    state_dict: Mapping[str, Any],
    *,
    param_shapes: Sequence[Sequence[Sequence[int] | None]] | None,
    param_dtypes: Sequence[Sequence[torch.dtype | None]] | None,
    optimizer_class: str | None,
    optimizer_name: str | None,
    scheduler_state: Mapping[str, Any] | None,
    scheduler_class: str | None,
    scheduler_name: str | None,
    scheduler_kwargs: Any,
    accumulator_state: Mapping[str, Any] | None = None,
    accumulator_class: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> _Payload:
    """Turn a torch-format state dict (and the rest) into what the checkpoint's files hold."""
    payload = _optimizer_payload(
        state_dict,
        _records(state_dict, param_shapes, param_dtypes),
        optimizer_class=optimizer_class,
        optimizer_name=optimizer_name,
    )
    if metadata:
        payload.meta["info"] = dict(metadata)
    if scheduler_state is not None:
        payload.scheduler_doc = _scheduler_document(
            scheduler_state, scheduler_class, scheduler_name, scheduler_kwargs
        )
    if accumulator_state is not None:
        enc = Encoder()
        acc_meta = {
            "format": KIND_ACCUMULATOR,
            "format_version": FORMAT_VERSION,
            "class": accumulator_class,
            "state": enc.encode(accumulator_state, "state", "accumulator.state_dict()"),
        }
        payload.accumulator = (enc.tensors, acc_meta)
    return payload


def save_state(
    save_directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    model: torch.nn.Module | None = None,
    max_shard_size: int | str | None = None,
    fsync: bool = False,
    consolidate_to: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Save optimizer (and scheduler / gradient-accumulator) state to ``save_directory``; returns the file paths.

    Writes ``optimizer.safetensors`` (or ``optimizer-0000i-of-0000N.safetensors`` shards plus
    ``optimizer.safetensors.index.json`` when the state exceeds ``max_shard_size``), ``scheduler.json`` and
    ``accumulator.safetensors``. State is keyed by parameter name when the optimizer was given named parameters.

    The directory is updated atomically: a process killed mid-save leaves the previous checkpoint loadable.
    ``fsync=True`` also flushes every file and the directory, so the checkpoint survives a power loss too. A
    second process saving into the same directory at the same time fails at once (``.hf_optim.lock``).

    ``model``: the trained model. With a plain model it names the parameters (when the optimizer was not given
    ``named_parameters()``). When the optimizer's parameters are FSDP2 ``DTensor``s the state is sharded and
    ``model`` is required: call ``save_state`` on every process; each writes its own shard (format version 2,
    ``docs/FORMAT.md``), in files of about ``max_shard_size`` per process (default ``"5GB"``, as for the other files),
    and ``consolidate_to`` also writes the ordinary single-process checkpoint there (from rank 0).

    Args:
        save_directory: The checkpoint folder; created if missing.
        optimizer: The optimizer whose state is saved (an Accelerate-wrapped one is unwrapped).
        scheduler: A learning-rate schedule to save as ``scheduler.json``, or ``None``.
        accumulator: A ``GradientAccumulator`` to save as ``accumulator.safetensors``, or ``None``.
        model: The trained model: names the parameters; required for sharded (FSDP2) state.
        max_shard_size: The largest file size before the state is split, as bytes or a string like ``"5GB"``.
        fsync: Flush every file and the directory to disk before returning.
        consolidate_to: For sharded state only: also write the single-process checkpoint to this folder.

    Returns:
        The paths of the files written (for sharded state, the manifest).

    Raises:
        ValueError: ``consolidate_to`` given for state that is not sharded, a bad ``max_shard_size``, or state
            that cannot be stored (non-string keys, reserved names).
        TypeError: State of a type that cannot be stored.
        RuntimeError: Another process is saving into the same folder (``.hf_optim.lock`` is held).

    Example:
        ```python
        optimizer = hf_optim.AdamW(model.parameters(), lr=1e-3)
        hf_optim.save_state("ckpt", optimizer)
        hf_optim.load_state("ckpt", optimizer)
        ```
    """
    zero_optimizer = zero.find_zero(optimizer, model)
    if zero_optimizer is not None:
        if model is None:
            raise ValueError(
                "the optimizer is DeepSpeed ZeRO's: pass model= (the engine) to name its parameters"
            )
        if accumulator is not None:
            raise ValueError(
                "a GradientAccumulator is not saved with ZeRO state: DeepSpeed accumulates gradients"
            )
        layout = zero.zero_layout(zero_optimizer, model)
        client_class = qualname(layout.client)
        path = zero.save_zero_state(
            os.fspath(save_directory), layout, scheduler, optimizer_class=client_class, engine=model
        )
        return [path]
    opt = unwrap_optimizer(optimizer)
    if sharded.is_sharded(opt):
        sharded.require_model(opt, model)
        assert model is not None  # for the type checker: require_model raised otherwise
        manifest = sharded.save_sharded_state(
            save_directory,
            opt,
            scheduler,
            accumulator,
            model=model,
            max_shard_size=DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size,
        )
        if consolidate_to is not None and sharded.rank() == 0:
            consolidate_state(save_directory, consolidate_to, fsync=fsync)
        sharded.barrier()
        return [manifest]
    if consolidate_to is not None:
        raise ValueError("consolidate_to= applies to sharded (FSDP2) optimizer state only")
    state_dict = opt.state_dict()
    if model is not None:
        names = sharded.parameter_names(model, opt)
        for sd_group, group in zip(state_dict["param_groups"], opt.param_groups, strict=True):
            sd_group.setdefault("param_names", [names[id(p)] for p in group["params"]])
    shapes = [[list(p.shape) for p in group["params"]] for group in opt.param_groups]
    dtypes = [[p.dtype for p in group["params"]] for group in opt.param_groups]
    for sd_group, group in zip(state_dict["param_groups"], opt.param_groups, strict=True):
        if "param_names" not in sd_group and group.get("param_names") is not None:
            sd_group["param_names"] = group["param_names"]
    sched: dict[str, Any] = {}
    if scheduler is not None:
        inner = unwrap_scheduler(scheduler)
        if not callable(getattr(inner, "state_dict", None)):
            raise TypeError(f"scheduler must have a state_dict() method, got {type(scheduler).__name__}")
        config = getattr(inner, "hf_optim_config", None)
        sched = {
            "scheduler_state": inner.state_dict(),
            "scheduler_class": qualname(inner),
            "scheduler_name": config.get("name") if isinstance(config, Mapping) else None,
            "scheduler_kwargs": config.get("kwargs") if isinstance(config, Mapping) else None,
        }
    acc: dict[str, Any] = {}
    if accumulator is not None:
        if not callable(getattr(accumulator, "state_dict", None)):
            raise TypeError(f"accumulator must have a state_dict() method, got {type(accumulator).__name__}")
        acc = {"accumulator_state": accumulator.state_dict(), "accumulator_class": qualname(accumulator)}
    return save_state_dict(
        save_directory,
        state_dict,
        param_shapes=shapes,
        param_dtypes=dtypes,
        optimizer_class=qualname(opt),
        optimizer_name=registry.optimizer_name(opt),
        max_shard_size=DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size,
        fsync=fsync,
        **sched,
        **acc,
    )


def _save_payload(
    directory: str,
    payload: _Payload,
    shard_size: int,
    fsync: bool,
    fill: Callable[[str], torch.Tensor] | None = None,
    fill_accumulator: Callable[[str], torch.Tensor] | None = None,
) -> list[str]:
    """Write a checkpoint atomically (``commit``, under ``save_lock``).

    Without ``fill`` the optimizer tensors are written as they are (``save_file``). With it, the payload's
    ``meta``-device tensors are placeholders (dtype, shape) and each file is written tensor by tensor, ``fill``
    building each tensor when its turn comes (at most one alive at a time): same files, same tensor layout.
    ``fill_accumulator`` does the same for the accumulator's placeholders.
    """
    tensors, meta = payload.tensors, payload.meta
    checkpoint_id = new_checkpoint_id()
    meta = {**meta, "checkpoint_id": checkpoint_id}
    meta["files"] = {
        "scheduler": SCHEDULER_NAME if payload.scheduler_doc is not None else None,
        "accumulator": ACCUMULATOR_NAME if payload.accumulator is not None else None,
    }

    def write_tensors(path: str, keys: Sequence[str], md: dict[str, str]) -> None:
        items = {k: tensors[k] for k in keys}
        if fill is None:
            write_safetensors(path, items, md, fsync=fsync)
        else:
            write_safetensors_streaming(path, items, fill, md, fsync=fsync)

    companions: list[PendingFile] = []
    if payload.scheduler_doc is not None:
        doc = {**payload.scheduler_doc, "checkpoint_id": checkpoint_id}
        companions.append(PendingFile(SCHEDULER_NAME, lambda path: write_json(path, doc, fsync=fsync)))
    if payload.accumulator is not None:
        acc_tensors, acc_meta = payload.accumulator
        acc_md = {"format": "pt", METADATA_KEY: json.dumps({**acc_meta, "checkpoint_id": checkpoint_id})}

        def write_accumulator(path: str) -> None:
            if fill_accumulator is None:
                write_safetensors(path, acc_tensors, acc_md, fsync=fsync)
            else:
                write_safetensors_streaming(path, acc_tensors, fill_accumulator, acc_md, fsync=fsync)

        companions.append(PendingFile(ACCUMULATOR_NAME, write_accumulator))

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=OPTIMIZER_SHARD_PATTERN, max_shard_size=shard_size
    )
    shards = split.filename_to_tensors if tensors else {OPTIMIZER_NAME: []}
    if len(shards) == 1:
        md = {"format": "pt", METADATA_KEY: json.dumps(meta, allow_nan=False)}
        single = next(iter(shards.values()))
        manifest = PendingFile(OPTIMIZER_NAME, lambda path: write_tensors(path, single, md))
    else:
        for shard_name, keys in shards.items():
            shard_meta = {
                "format": KIND_SHARD,
                "format_version": FORMAT_VERSION,
                "checkpoint_id": checkpoint_id,
                "shard": shard_name,
            }
            shard_md = {"format": "pt", METADATA_KEY: json.dumps(shard_meta)}

            def write_shard(path: str, keys: list[str] = keys, md: dict = shard_md) -> None:
                write_tensors(path, keys, md)

            companions.append(PendingFile(shard_name, write_shard))
        index = {
            "metadata": {"total_size": split.metadata["total_size"], METADATA_KEY: meta},
            "weight_map": {k: split.tensor_to_filename[k] for k in tensors},
        }
        manifest = PendingFile(OPTIMIZER_INDEX_NAME, lambda path: write_json(path, index, fsync=fsync))
    os.makedirs(directory, exist_ok=True)
    with save_lock(directory):
        written = commit(directory, checkpoint_id, companions, manifest, fsync)
    logger.debug("saved optimizer state to %s (%d file(s))", directory, len(written))
    return written


def save_object_state(path: str | os.PathLike[str], value: Any, *, kind: str) -> None:
    """Save one value tree (nested dict/list/tuple/str/int/float/bool/None/tensors) to one safetensors file.

    Atomic (temporary name, then rename). ``kind`` names what it is; :func:`load_object_state` checks it. For
    run state that is neither optimizer nor scheduler (a sampler's position, counters), without pickle.

    Args:
        path: The file to write.
        value: The value tree.
        kind: What the value is (recorded, and checked when loading).

    Raises:
        TypeError: If the tree holds a value of another type.

    Example:
        ```python
        import torch
        import hf_optim

        hf_optim.save_object_state("sampler.safetensors", {"epoch": 3, "seed": torch.arange(2)}, kind="sampler")
        value = hf_optim.load_object_state("sampler.safetensors", kind="sampler")
        assert value["epoch"] == 3 and torch.equal(value["seed"], torch.arange(2))
        ```
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    path = os.fspath(path)
    enc = Encoder()
    node = enc.encode(value, "value", f"{kind} state")
    checkpoint_id = new_checkpoint_id()
    meta = {
        "format": KIND_OBJECT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "kind": kind,
        "value": node,
    }
    directory, name = os.path.split(os.path.abspath(path))
    # a temporary file of its own, not a staging folder: a checkpoint saved into the same folder at the same
    # time (another process's optimizer state beside this process's random states) clears staging folders
    tmp = os.path.join(directory, f".{name}.{checkpoint_id}.tmp")
    try:
        write_safetensors(tmp, enc.tensors, {"format": "pt", METADATA_KEY: json.dumps(meta)}, fsync=False)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def consolidate_state(
    sharded_directory: str | os.PathLike[str],
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    fsync: bool = False,
) -> list[str]:
    """Write the ordinary single-process checkpoint of a sharded (FSDP2) one, in one process, without
    torch.distributed; returns the written paths.

    Streams: each full tensor is assembled from its chunks (read through the checked shard files) when the writer
    reaches it and dropped once written, so the memory needed is about the largest tensor plus a read buffer,
    not the whole state. The files are those ``save_state_dict`` writes for the same state (``max_shard_size``
    splits them), committed atomically the same way; ``fsync=True`` also flushes them and the directory.

    Args:
        sharded_directory: The folder of the sharded checkpoint.
        save_directory: The folder to write the single-process checkpoint into.
        max_shard_size: Split the state into files of at most this size.
        fsync: Flush the files and the folder to disk before returning.

    Returns:
        The paths written.

    Raises:
        CheckpointError: If the sharded checkpoint is missing, incomplete or inconsistent.
        OSError: If writing fails.

    Example:
        <!-- skip: needs a sharded checkpoint, written by several FSDP2 processes (see the FSDP2 page) -->
        ```python
        import hf_optim

        hf_optim.consolidate_state("sharded-ckpt", "ckpt")  # also: hf-optim consolidate sharded-ckpt ckpt
        print(hf_optim.inspect_state("ckpt"))
        ```
    """
    directory = _target_directory(save_directory)
    shard_size = parse_max_shard_size(max_shard_size)
    with sharded.open_consolidation(sharded_directory) as source:
        payload = _state_dict_payload(
            source.state_dict,
            param_shapes=source.param_shapes,
            param_dtypes=None,
            optimizer_class=source.optimizer_class,
            optimizer_name=None,
            scheduler_state=source.scheduler_state,
            scheduler_class=source.scheduler_class,
            scheduler_name=source.scheduler_name,
            scheduler_kwargs=source.scheduler_kwargs,
            accumulator_state=source.accumulator_state,
            accumulator_class=source.accumulator_class,
        )

        def fill(key: str) -> torch.Tensor:
            placeholder = payload.tensors[key]
            return source.full_tensor(*payload.origins[key]) if placeholder.is_meta else placeholder

        def fill_gradient(key: str) -> torch.Tensor:  # the codec names gradient i "state.gradients.<i>"
            return source.full_gradient(int(key.rsplit(".", 1)[1]))

        return _save_payload(directory, payload, shard_size, fsync, fill, fill_gradient)
