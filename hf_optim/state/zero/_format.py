"""Format version 3 of the sharded family: chunks that are element ranges of the flattened global tensor."""

from __future__ import annotations

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
    "shard_file_name",
]


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
