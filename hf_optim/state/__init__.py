"""Optimizer, scheduler and gradient-accumulator state as safetensors + JSON, local files only (no pickle).

Layers, as in ``huggingface_hub.serialization``: :func:`save_state` / :func:`load_state` work on live objects;
:func:`save_state_dict` / :func:`load_state_dict` on a torch-format optimizer state dict; :func:`save_object_state`
/ :func:`load_object_state` on one value tree in one file. The layout is ``docs/FORMAT.md``; every read is
validated against hostile files. The Hub (repo ids, ``hf://`` URLs) is added by :mod:`hf_optim.hub`.
"""

from hf_optim.errors import CheckpointError
from hf_optim.state.codec import register_json_type
from hf_optim.state.format import (
    ACCUMULATOR_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    parse_max_shard_size,
)
from hf_optim.state.inspect import StateInfo, inspect_sharded_state, inspect_state
from hf_optim.state.load import LoadReport, has_state, load_object_state, load_state, load_state_dict
from hf_optim.state.save import consolidate_state, save_object_state, save_state, save_state_dict
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME, ShardedStateInfo, has_sharded_state

__all__ = [
    "ACCUMULATOR_NAME",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "OPTIMIZER_INDEX_NAME",
    "OPTIMIZER_NAME",
    "OPTIMIZER_SHARD_PATTERN",
    "SCHEDULER_NAME",
    "SHARDED_MANIFEST_NAME",
    "CheckpointError",
    "LoadReport",
    "ShardedStateInfo",
    "StateInfo",
    "consolidate_state",
    "has_sharded_state",
    "has_state",
    "inspect_sharded_state",
    "inspect_state",
    "load_object_state",
    "load_state",
    "load_state_dict",
    "parse_max_shard_size",
    "register_json_type",
    "save_object_state",
    "save_state",
    "save_state_dict",
]
