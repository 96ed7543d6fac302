"""Sharded optimizer state (FSDP2 ``DTensor`` state) saved per process, resumed on any number of processes.

Every process writes its own shard of the state tensors with ``torch.distributed.checkpoint`` in its Hugging Face
safetensors layout (one safetensors file per process and ~``max_shard_size``, no pickled ``.metadata``), keyed
``state.<parameter name>.<state key>`` as in the single-process format. The rest (param groups, non-tensor
state, the scheduler, hf_optim's metadata) is one JSON manifest written once, last, by rank 0. Loading checks
the manifest and every shard header against the live model on every rank, the ranks agree on the verdict, then
each rank reads only the byte ranges of its own chunks (resharding to any number of processes, or to one plain
process). The layout is ``docs/FORMAT.md``, format version 2:

    optimizer.sharded.json                 manifest: checkpoint id, groups, non-tensor state, scheduler
    optimizer-shards-<checkpoint id>/      shard-RRRRR-model-IIIII-of-NNNNN.safetensors (R: rank + 1)

A new save writes a new shard folder before it replaces the manifest, so a save killed on any rank leaves the
previous checkpoint loadable. Modules: ``_format`` (names, JSON values), ``_dist`` (process-group helpers),
``_save``, ``_read`` (manifest and headers), ``_load`` (load, inspect), ``_consolidate`` (the state of one
process, one tensor at a time).
"""

from hf_optim.state.sharded._consolidate import ConsolidationSource, open_consolidation
from hf_optim.state.sharded._dist import (
    agree,
    barrier,
    broadcast_text,
    is_sharded,
    like_parameter,
    local_rank,
    local_region,
    machine_union,
    parameter_names,
    rank,
    require_model,
)
from hf_optim.state.sharded._format import (
    CHECKPOINT_ID_KEY,
    KIND,
    SHARD_DIR_RE,
    SHARD_FILE_RE,
    SHARDED_FORMAT_VERSION,
    SHARDED_MANIFEST_NAME,
    decode_value,
    encode_value,
    saved_optimizer_class,
)
from hf_optim.state.sharded._load import (
    ShardedReader,
    ShardedStateInfo,
    inspect_sharded_state,
    machine_files,
)
from hf_optim.state.sharded._read import has_sharded_state, sharded_manifest_files
from hf_optim.state.sharded._save import save_sharded_state

__all__ = [
    "CHECKPOINT_ID_KEY",
    "KIND",
    "SHARDED_FORMAT_VERSION",
    "SHARDED_MANIFEST_NAME",
    "SHARD_DIR_RE",
    "SHARD_FILE_RE",
    "ConsolidationSource",
    "ShardedReader",
    "ShardedStateInfo",
    "agree",
    "barrier",
    "broadcast_text",
    "decode_value",
    "encode_value",
    "has_sharded_state",
    "inspect_sharded_state",
    "is_sharded",
    "like_parameter",
    "local_rank",
    "local_region",
    "machine_files",
    "machine_union",
    "open_consolidation",
    "parameter_names",
    "rank",
    "require_model",
    "save_sharded_state",
    "saved_optimizer_class",
    "sharded_manifest_files",
]
