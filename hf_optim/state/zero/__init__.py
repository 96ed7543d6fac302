"""DeepSpeed ZeRO (stages 1, 2, 3) optimizer state in the sharded format family, format version 3.

Each process writes only its own partition, as 1-D element ranges of each parameter's flattened state tensors
(ZeRO partitions flat buffers at arbitrary element offsets), plus the fp32 master weights under bf16 / fp16, the
loss scaler, the engine's counters, the groups' hyperparameters and the scheduler; rank 0 writes the manifest.
Loading reads element ranges of any checkpoint of the family (version 2's row blocks too, and single-process
files) into ZeRO on any number of processes and any stage, or into FSDP2 / one plain process.

Modules: ``_layout`` (where ZeRO keeps what), ``_format``, ``_save``; ``_read`` (manifests and partition files:
checked, read by byte ranges), ``_reader`` (the checkpoint model's reader over it), ``_target`` (ZeRO's flat
partitions as a load target), ``_inspect`` (describing a checkpoint), ``_files`` (which files a machine's
processes read); ``_stock`` (stock DeepSpeed checkpoint folders, read safely) and ``_convert`` (into this format).
"""

from hf_optim.state.zero._convert import convert_deepspeed_checkpoint
from hf_optim.state.zero._files import is_range_layout, machine_files, manifest_files
from hf_optim.state.zero._format import ZERO_FORMAT_VERSION
from hf_optim.state.zero._inspect import inspect_range_state
from hf_optim.state.zero._layout import ZeroLayout, find_zero, zero_layout
from hf_optim.state.zero._read import Plan, plan_from_checkpoint, read_manifest
from hf_optim.state.zero._reader import RangeReader
from hf_optim.state.zero._save import save_zero_state
from hf_optim.state.zero._stock import DEEPSPEED_GLOBALS, find_deepspeed_checkpoint, read_stage0_checkpoint
from hf_optim.state.zero._target import ZeroInstall, zero_view

__all__ = [
    "DEEPSPEED_GLOBALS",
    "ZERO_FORMAT_VERSION",
    "Plan",
    "RangeReader",
    "ZeroInstall",
    "ZeroLayout",
    "convert_deepspeed_checkpoint",
    "find_deepspeed_checkpoint",
    "find_zero",
    "inspect_range_state",
    "is_range_layout",
    "machine_files",
    "manifest_files",
    "plan_from_checkpoint",
    "read_manifest",
    "read_stage0_checkpoint",
    "save_zero_state",
    "zero_layout",
    "zero_view",
]
