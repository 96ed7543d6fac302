"""The sharded layout's names and constants, and its JSON values (through the state codec)."""

from __future__ import annotations

import re
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.codec import Encoder, decode
from hf_optim.state.format import dtype_name

SHARDED_MANIFEST_NAME = "optimizer.sharded.json"
"""The manifest of a sharded (FSDP2, DeepSpeed ZeRO) checkpoint, written last by rank 0."""
SHARDED_FORMAT_VERSION = 2
KIND = "hf_optim.optimizer_sharded"
# used with fullmatch: "$" would also accept a trailing newline, "\d" other scripts' digits
SHARD_DIR_RE = re.compile(r"optimizer-shards-([0-9a-f]{32})")
SHARD_FILE_RE = re.compile(r"shard-[0-9]{5}-model-[0-9]{5}-of-[0-9]{5}\.safetensors")
CHECKPOINT_ID_KEY = "hf_optim_checkpoint_id"  # in each shard file's __metadata__: the save it belongs to
DCP_INFO_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
DCP_OFFSETS_KEY = "saved_offsets"
ACCUMULATOR_PREFIX = "accumulator.gradients."  # the accumulator's gradient i is the tensor f"{prefix}{i}"
RESERVED = frozenset({"params", "param_names", "state", "param_groups"})
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)
}
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def saved_optimizer_class(doc: Any) -> str | None:
    """The optimizer class a sharded-family manifest records (``optimizer.class``), if it is a string."""
    opt = doc.get("optimizer") if isinstance(doc, dict) else None
    return opt.get("class") if isinstance(opt, dict) and isinstance(opt.get("class"), str) else None


def encode_value(value: Any, key: str, where: str) -> Any:
    """``value`` as JSON through the state codec (tuples, dicts, registered objects keep their types); a
    one-element tensor (``step``) as ``{"scalar": x, "dtype": d}``. Other tensors are refused: they go to the
    shards, not to the manifest."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not is_dtensor(value):
        if value.dtype not in DTYPES.values():
            raise ValueError(f"{where}: a scalar of dtype {value.dtype} cannot be saved")
        return {"scalar": value.item(), "dtype": dtype_name(value.dtype)}
    enc = Encoder()
    node = enc.encode(value, key, where)
    if enc.tensors:
        raise ValueError(
            f"{where}: tensors inside hyperparameters or scheduler state cannot be saved sharded"
        )
    return node


def decode_value(node: Any, where: str) -> Any:
    if isinstance(node, dict) and set(node) == {"scalar", "dtype"}:
        number, dtype = node["scalar"], DTYPES.get(node["dtype"]) if isinstance(node["dtype"], str) else None
        if dtype is None or isinstance(number, bool) or not isinstance(number, int | float):
            raise CheckpointError(f"{where}: bad scalar {str(node)[:100]}")
        try:
            return torch.tensor(number, dtype=dtype)
        except (OverflowError, RuntimeError, ValueError):
            raise CheckpointError(
                f"{where}: scalar {str(number)[:50]} does not fit {node['dtype']}"
            ) from None
    return decode(node, {}, where)
