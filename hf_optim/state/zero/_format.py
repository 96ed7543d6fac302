"""Format version 3 of the sharded family: chunks that are element ranges of the flattened global tensor."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from hf_optim.state.sharded import (
    CHECKPOINT_ID_KEY,
    KIND,
    SHARD_DIR_RE,
    SHARD_FILE_RE,
    SHARDED_MANIFEST_NAME,
    decode_value,
    encode_value,
)

ZERO_FORMAT_VERSION = 3
RANGES_KEY = "hf_optim_ranges"  # in each partition file's __metadata__: {tensor: [start, stop]}

__all__ = [
    "CHECKPOINT_ID_KEY",
    "KIND",
    "RANGES_KEY",
    "SHARDED_MANIFEST_NAME",
    "SHARD_DIR_RE",
    "SHARD_FILE_RE",
    "ZERO_FORMAT_VERSION",
    "decode_value",
    "encode_value",
    "gather_text",
    "manifest",
    "partition_metadata",
    "shard_file_name",
]


def partition_metadata(checkpoint_id: str, ranges: dict[str, list[int]]) -> dict[str, str]:
    """A partition file's ``__metadata__``: the save that wrote it and each tensor's ``[start, stop)``."""
    return {"format": "pt", CHECKPOINT_ID_KEY: checkpoint_id, RANGES_KEY: json.dumps(ranges)}


def manifest(
    checkpoint_id: str,
    *,
    optimizer_class: str | None,
    world: int,
    stage: int,
    dtype: torch.dtype,
    param_groups: list[dict[str, Any]],
    state: dict[str, Any],
    master_weights: dict[str, Any] | None,
    loss_scaler: dict[str, Any] | None,
    engine: dict[str, int] | None,
    scheduler: dict[str, Any] | None,
    info: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest of a format-3 checkpoint (docs/FORMAT.md), written by a save or a conversion."""
    doc: dict[str, Any] = {
        "format": KIND,
        "format_version": ZERO_FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "optimizer": {"class": optimizer_class},
        "world_size": world,
        "zero": {"stage": stage, "dtype": str(dtype).removeprefix("torch.")},
        "shards": {
            "folder": f"optimizer-shards-{checkpoint_id}",
            "files": [shard_file_name(r) for r in range(world)],
        },
        "param_groups": param_groups,
        "state": state,
        "master_weights": master_weights,
        "loss_scaler": loss_scaler,
        "engine": engine,
        "scheduler": scheduler,
        "accumulator": None,
        "versions": {"torch": torch.__version__},
    }
    if info is not None:
        doc["info"] = info
    return doc


def shard_file_name(rank: int) -> str:
    """The partition file of process ``rank`` (the sharded family's file names, one file per process)."""
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


def gather_text(text: str) -> list[str]:
    """Every process's ``text``, by rank (a collective; no pickling)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [text]
    data = text.encode()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(counts), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    bufs = [torch.zeros_like(buf) for _ in counts]
    dist.all_gather(bufs, buf)
    return [bytes(b[:n].tolist()).decode() for b, n in zip(bufs, counts, strict=True)]
