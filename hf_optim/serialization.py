"""Deprecated alias of :mod:`hf_optim.state` (and, for Hub-aware loading, :mod:`hf_optim.hub`).

Import from ``hf_optim`` or ``hf_optim.state`` instead; this module re-exports the public names.
"""

from __future__ import annotations

import warnings

from hf_optim.hub import inspect_state, load_state
from hf_optim.state import (
    ACCUMULATOR_NAME,
    FORMAT_VERSION,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    OPTIMIZER_SHARD_PATTERN,
    SCHEDULER_NAME,
    CheckpointError,
    LoadReport,
    StateInfo,
    has_state,
    save_state,
)

warnings.warn(
    "hf_optim.serialization is deprecated: import from hf_optim or hf_optim.state",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ACCUMULATOR_NAME",
    "FORMAT_VERSION",
    "OPTIMIZER_INDEX_NAME",
    "OPTIMIZER_NAME",
    "OPTIMIZER_SHARD_PATTERN",
    "SCHEDULER_NAME",
    "CheckpointError",
    "LoadReport",
    "StateInfo",
    "has_state",
    "inspect_state",
    "load_state",
    "save_state",
]
