"""Saving sharded state: every process writes its shard with DCP's Hugging Face layout, rank 0 the manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from hf_optim._utils import unwrap_optimizer, unwrap_scheduler
from hf_optim.state.atomic import follow_umask
from hf_optim.state.format import DEFAULT_MAX_SHARD_SIZE, qualname
from hf_optim.state.sharded._dist import (
    agree,
    barrier,
    broadcast_id,
    distributed,
    parameter_names,
    rank,
)
from hf_optim.state.sharded._format import (
    ACCUMULATOR_PREFIX,
    CHECKPOINT_ID_KEY,
    DCP_INFO_KEY,
    DCP_OFFSETS_KEY,
    KIND,
    SHARD_DIR_RE,
    SHARD_FILE_RE,
    SHARDED_FORMAT_VERSION,
    SHARDED_MANIFEST_NAME,
    encode_value,
    is_dtensor,
)

logger = logging.getLogger(__name__)


class _StreamingWriter(HuggingFaceStorageWriter):
    """``HuggingFaceStorageWriter`` writing each file with ``safetensors.torch.save_file``, each file's metadata
    naming the save that wrote it (``hf_optim_checkpoint_id``).

    The stock writer serialises a whole file to ``bytes`` in memory first (two transient copies of the
    process's shard of that file); ``save_file`` streams the tensors' memory to disk. Same file names, same
    ``DCP_SHARDING_INFO`` metadata, so ``HuggingFaceStorageReader`` reads the result unchanged.
    """

    def __init__(self, path: str, checkpoint_id: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.hf_optim_checkpoint_id = checkpoint_id

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        mapping: dict[str, int] | None = plan.storage_data.get("fqn_to_index_mapping")
        shard_index = plan.storage_data.get("shard_index", 1)
        highest = max(mapping.values()) if mapping else 1
        files: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"{item.index.fqn}: only tensors can be written to safetensors")
            files.setdefault(mapping[item.index.fqn] if mapping else 1, []).append(item)
        results: list[WriteResult] = []
        for index, items in sorted(files.items()):
            name = f"shard-{shard_index:05d}-model-{index:05d}-of-{highest:05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            offsets: dict[str, dict[str, list[int]]] = {}
            for item in items:
                data = planner.resolve_data(item)
                if not isinstance(data, torch.Tensor) or item.tensor_data is None:
                    raise TypeError(f"{item.index.fqn}: only tensors can be written to safetensors")
                tensor = data.detach().cpu()
                if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                tensors[item.index.fqn] = tensor
                offsets[item.index.fqn] = {DCP_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                results.append(WriteResult(index=item.index, size_in_bytes=tensor.nbytes, storage_data=name))
            metadata = {
                DCP_INFO_KEY: json.dumps(offsets),
                "DCP_VERSION": "1.0",
                "format": "pt",
                CHECKPOINT_ID_KEY: self.hf_optim_checkpoint_id,
            }
            save_file(tensors, os.path.join(str(self.path), name), metadata=metadata)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator: record which file holds each chunk (for the manifest); no index file."""
        sizes = {
            (fqn, tuple(chunk.offsets)): list(chunk.sizes)
            for fqn, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
            for chunk in md.chunks
        }
        self.chunks: dict[str, list[dict[str, Any]]] = {}
        for result in (r for rank_results in results for r in rank_results):
            offsets = list(result.index.offset or ())
            self.chunks.setdefault(result.index.fqn, []).append(
                {
                    "file": result.storage_data,
                    "offsets": offsets,
                    "sizes": sizes[result.index.fqn, tuple(offsets)],
                }
            )


def _file_buckets(tensors: Mapping[str, torch.Tensor], max_shard_size: int | str) -> dict[str, int]:
    """Tensor key -> file number (from 1), the same on every rank, so that each process's files stay near
    ``max_shard_size``: tensors are split by their per-process share of the global size, in order, with
    huggingface_hub's shard splitter (which also parses ``"100MB"``-style sizes)."""
    world = dist.get_world_size() if distributed() else 1
    shares = {
        key: torch.empty(math.ceil(t.numel() / world), dtype=t.dtype, device="meta")
        for key, t in tensors.items()
    }
    split = split_torch_state_dict_into_shards(
        shares, filename_pattern="file{suffix}", max_shard_size=max_shard_size
    )
    return {key: i for i, keys in enumerate(split.filename_to_tensors.values(), start=1) for key in keys}


def save_sharded_state(
    save_directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    model: torch.nn.Module,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> str:
    """Save sharded (FSDP2) optimizer state: every process writes its shard; returns the manifest's path.

    Call it on every process of the group, with the same ``save_directory`` (a filesystem all processes see).
    No process gathers the state: each writes only its local shards, in files of about ``max_shard_size``
    (``"100MB"`` or a number of bytes), which also bounds the memory the writer needs beyond the state itself.
    A ``GradientAccumulator``'s gradients (``DTensor``s like the parameters' gradients) are saved sharded too,
    each with the name of a parameter laid out like it (where loading places it); its counters go to the
    manifest.
    """
    import torch.distributed.checkpoint as dcp

    directory = os.fspath(save_directory)
    opt = unwrap_optimizer(optimizer)
    names = parameter_names(model, opt)
    checkpoint_id = broadcast_id()
    shard_dir = f"optimizer-shards-{checkpoint_id}"

    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    state: dict[str, dict[str, Any]] = {}
    for g, group in enumerate(opt.param_groups):
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append(
            {
                "params": [names[id(p)] for p in group["params"]],
                "hyperparameters": encode_value(hyper, f"param_groups.{g}", f"param_groups[{g}]"),
            }
        )
        for p in group["params"]:
            entries = opt.state.get(p)
            if not entries:
                continue
            name = names[id(p)]
            record: dict[str, Any] = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if value.shape != p.shape:
                        raise ValueError(
                            f"state[{name!r}][{key!r}] has shape {list(value.shape)}, its parameter "
                            f"{list(p.shape)}: sharded saving supports state shaped like the parameter"
                        )
                    tensor_key = f"state.{name}.{key}"
                    tensors[tensor_key] = value
                    record[key] = {
                        "sharded": tensor_key,
                        "shape": list(value.shape),
                        "dtype": str(value.dtype).removeprefix("torch."),
                    }
                else:
                    record[key] = {
                        "value": encode_value(value, f"state.{name}.{key}", f"state[{name!r}][{key!r}]")
                    }
            state[name] = record
    accumulator_doc = _accumulator_entry(accumulator, model, tensors) if accumulator is not None else None
    scheduler_state = None
    if scheduler is not None:
        inner = unwrap_scheduler(scheduler)
        scheduler_state = {
            "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "config": getattr(inner, "hf_optim_config", None),
            "state_dict": encode_value(inner.state_dict(), "scheduler", "scheduler.state_dict()"),
        }

    if rank() == 0:
        os.makedirs(directory, exist_ok=True)
    barrier()
    tmp_dir = os.path.join(directory, f".{shard_dir}.tmp")
    error = None
    writer = None
    try:
        writer = _StreamingWriter(
            tmp_dir,
            checkpoint_id,
            fqn_to_index_mapping=_file_buckets(tensors, max_shard_size),
            save_distributed=True,
        )
        with warnings.catch_warnings():
            # one process without a process group: DCP warns that it "assumes" exactly that
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save(tensors, storage_writer=writer, no_dist=not distributed())
    except (Exception, CheckpointException) as exc:  # DCP wraps any rank's failure in a BaseException
        error = f"{type(exc).__name__}: {exc}"
    error = agree(error)
    if error is not None:
        raise OSError(f"saving sharded optimizer state to {directory!r} failed: {error}")

    manifest_path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    if rank() == 0:
        shard_files = sorted(f for f in os.listdir(tmp_dir) if SHARD_FILE_RE.fullmatch(f))
        follow_umask(tmp_dir, [os.path.join(tmp_dir, f) for f in shard_files])
        world = dist.get_world_size() if distributed() else 1
        manifest = {
            "format": KIND,
            "format_version": SHARDED_FORMAT_VERSION,
            "checkpoint_id": checkpoint_id,
            "optimizer": {"class": f"{type(opt).__module__}.{type(opt).__qualname__}"},
            "world_size": world,
            "shards": {"folder": shard_dir, "files": shard_files},
            "param_groups": groups,
            "state": state,
            "scheduler": scheduler_state,
            "accumulator": accumulator_doc,
            "versions": {"torch": torch.__version__},
        }
        assert writer is not None  # for the type checker: the save raised above otherwise
        entries = [entry for record in state.values() for entry in record.values() if "sharded" in entry]
        entries += [entry for entry in (accumulator_doc or {}).get("gradients", ()) if entry is not None]
        for entry in entries:
            entry["chunks"] = sorted(writer.chunks[entry["sharded"]], key=lambda c: c["offsets"])
        os.replace(tmp_dir, os.path.join(directory, shard_dir))
        tmp_manifest = os.path.join(directory, f".{SHARDED_MANIFEST_NAME}.{checkpoint_id}.tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
        os.replace(tmp_manifest, manifest_path)
        _remove_stale(directory, keep=shard_dir)
    barrier()
    logger.debug("saved sharded optimizer state to %s", directory)
    return manifest_path


def _accumulator_entry(
    accumulator: Any, model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The manifest's record of a gradient accumulator; its gradients are added to ``tensors``."""
    if not callable(getattr(accumulator, "state_dict", None)):
        raise TypeError(f"accumulator must have a state_dict() method, got {type(accumulator).__name__}")
    value = accumulator.state_dict()
    if not isinstance(value, Mapping) or not isinstance(value.get("gradients"), list | tuple):
        raise ValueError("sharded saving supports accumulators whose state_dict() has a 'gradients' list")
    params = list(model.named_parameters())
    gradients: list[dict[str, Any] | None] = []
    for i, grad in enumerate(value["gradients"]):
        if grad is None:
            gradients.append(None)
            continue
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"accumulator gradient {i} is a {type(grad).__name__}, not a tensor")
        like = _laid_out_like(grad, params, i)
        if like is None:
            raise ValueError(
                f"accumulator gradient {i} (shape {list(grad.shape)}) is not laid out like any parameter of "
                "model: sharded saving supports gradients of the model's parameters"
            )
        key = f"{ACCUMULATOR_PREFIX}{i}"
        tensors[key] = grad
        gradients.append(
            {
                "sharded": key,
                "shape": list(grad.shape),
                "dtype": str(grad.dtype).removeprefix("torch."),
                "parameter": like,
            }
        )
    rest = {k: v for k, v in value.items() if k != "gradients"}
    return {
        "class": qualname(accumulator),
        "state": encode_value(rest, "accumulator", "accumulator.state_dict()"),
        "gradients": gradients,
    }


def _laid_out_like(
    grad: torch.Tensor, params: Sequence[tuple[str, torch.Tensor]], position: int
) -> str | None:
    """The name of a parameter with ``grad``'s global shape and placement (the ``position``-th first)."""

    from torch.distributed.tensor import DTensor

    def same(p: torch.Tensor) -> bool:
        if is_dtensor(p) != is_dtensor(grad) or p.shape != grad.shape:
            return False
        if not (isinstance(p, DTensor) and isinstance(grad, DTensor)):
            return True  # plain tensors of the same shape
        return p.device_mesh == grad.device_mesh and p.placements == grad.placements

    ordered = [*([params[position]] if position < len(params) else []), *params]
    return next((name for name, p in ordered if same(p)), None)


def _remove_stale(directory: str, *, keep: str) -> None:
    """Remove every shard folder but ``keep`` (the previous checkpoint's, and those of killed saves) and the
    temporary files of killed saves.

    Folders are first renamed to temporary names (instant), then deleted by a background thread: freeing the
    page cache of the previous checkpoint's files takes a while and need not hold up training. What a process
    exiting first leaves behind, the next save removes.
    """
    doomed = []
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry == keep:
            continue
        if SHARD_DIR_RE.fullmatch(entry):
            hidden = os.path.join(directory, f".{entry}.{uuid.uuid4().hex}.tmp")
            with contextlib.suppress(OSError):
                os.replace(path, hidden)
                doomed.append(hidden)
        elif entry.startswith(".optimizer-shards-") and entry.endswith(".tmp"):
            doomed.append(path)
        elif entry.startswith(f".{SHARDED_MANIFEST_NAME}.") and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(path)
    if doomed:
        threading.Thread(target=_remove_folders, args=(doomed,), name="hf_optim-cleanup", daemon=True).start()


def _remove_folders(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------------------------
