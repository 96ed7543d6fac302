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
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from hf_optim._utils import unwrap_optimizer, unwrap_scheduler
from hf_optim.state.sharded._dist import (
    agree,
    barrier,
    broadcast_id,
    distributed,
    parameter_names,
    rank,
)
from hf_optim.state.sharded._format import (
    DCP_INFO_KEY,
    DCP_OFFSETS_KEY,
    KIND,
    SHARD_DIR_RE,
    SHARD_FILE_RE,
    SHARDED_FORMAT_VERSION,
    SHARDED_MANIFEST_NAME,
    encode_value,
)

logger = logging.getLogger(__name__)


class _StreamingWriter(HuggingFaceStorageWriter):
    """``HuggingFaceStorageWriter`` writing each file with ``safetensors.torch.save_file``.

    The stock writer serialises a whole file to ``bytes`` in memory first (two transient copies of the
    process's shard of that file); ``save_file`` streams the tensors' memory to disk. Same file names, same
    ``DCP_SHARDING_INFO`` metadata, so ``HuggingFaceStorageReader`` reads the result unchanged.
    """

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
                tensor = planner.resolve_data(item).detach().cpu()
                if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                tensors[item.index.fqn] = tensor
                offsets[item.index.fqn] = {DCP_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                results.append(WriteResult(index=item.index, size_in_bytes=tensor.nbytes, storage_data=name))
            metadata = {DCP_INFO_KEY: json.dumps(offsets), "DCP_VERSION": "1.0", "format": "pt"}
            save_file(tensors, os.path.join(str(self.path), name), metadata=metadata)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


def _file_buckets(tensors: Mapping[str, torch.Tensor], max_file_size: int | str) -> dict[str, int]:
    """Tensor key -> file number (from 1), the same on every rank, so that each process's files stay near
    ``max_file_size``: tensors are split by their per-process share of the global size, in order, with
    huggingface_hub's shard splitter (which also parses ``"100MB"``-style sizes)."""
    world = dist.get_world_size() if distributed() else 1
    shares = {
        key: torch.empty(math.ceil(t.numel() / world), dtype=t.dtype, device="meta")
        for key, t in tensors.items()
    }
    split = split_torch_state_dict_into_shards(
        shares, filename_pattern="file{suffix}", max_shard_size=max_file_size
    )
    return {key: i for i, keys in enumerate(split.filename_to_tensors.values(), start=1) for key in keys}


def save_sharded_state(
    save_directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    model: torch.nn.Module,
    max_file_size: int | str = "100MB",
) -> str:
    """Save sharded (FSDP2) optimizer state: every process writes its shard; returns the manifest's path.

    Call it on every process of the group, with the same ``save_directory`` (a filesystem all processes see).
    No process gathers the state: each writes only its local shards, in files of about ``max_file_size``
    (``"100MB"`` or a number of bytes), which also bounds the memory the writer needs beyond the state itself.
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
    try:
        writer = _StreamingWriter(
            tmp_dir, fqn_to_index_mapping=_file_buckets(tensors, max_file_size), save_distributed=True
        )
        dcp.save(tensors, storage_writer=writer)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    error = agree(error)
    if error is not None:
        raise OSError(f"saving sharded optimizer state to {directory!r} failed: {error}")

    manifest_path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    if rank() == 0:
        shard_files = sorted(f for f in os.listdir(tmp_dir) if SHARD_FILE_RE.match(f))
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
            "versions": {"torch": torch.__version__},
        }
        os.replace(tmp_dir, os.path.join(directory, shard_dir))
        tmp_manifest = os.path.join(directory, f".{SHARDED_MANIFEST_NAME}.{checkpoint_id}.tmp")
        with open(tmp_manifest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
        os.replace(tmp_manifest, manifest_path)
        _remove_stale(directory, keep=shard_dir)
    barrier()
    logger.debug("saved sharded optimizer state to %s", directory)
    return manifest_path


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
        if SHARD_DIR_RE.match(entry):
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
