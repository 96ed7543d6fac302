"""hf_optim: legacy-exact optimizers, schedules and safetensors optimizer state for the Hugging Face ecosystem.

The core (optimizers, schedules, accumulation, serialization) depends only on torch, safetensors and
huggingface_hub. Integrations with transformers and accelerate are loaded lazily on first attribute access,
so ``import hf_optim`` never imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The 'hf_optim' library logger: its level (HF_OPTIM_VERBOSITY) and prefixed handler; the root logger is untouched.
from hf_optim import logging

# --- optimizers ---
from hf_optim.optimizers import AdamW, AdamWeightDecay, adam_weight_decay, adamw

# isort: split
from hf_optim.optimizers import BertAdam, OpenAIAdam, bert_adam, openai_adam  # pytorch-pretrained-bert's

# --- schedules, registry, accumulation ---
# isort: split
from hf_optim.accumulation import GradientAccumulator
from hf_optim.param_groups import get_decay_parameter_names, get_no_decay_parameter_names, group_parameters
from hf_optim.registry import (
    OptimizerInfo,
    SchedulerInfo,
    add_registry_listener,
    create_optimizer,
    create_scheduler,
    get_optimizer_info,
    get_scheduler,
    get_scheduler_info,
    list_optimizers,
    list_schedulers,
    optimizer_name,
    register_optimizer,
    register_scheduler,
    remove_registry_listener,
    scheduler_from_config,
)
from hf_optim.schedules import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_wsd_schedule,
)

# --- state files and the Hub ---
# isort: split
from hf_optim.hub import (
    HfUrl,
    download_checkpoint,
    inspect_state,
    load_state,
    parse_hf_url,
    push_state_to_hub,
    resolve_state_dir,
)
from hf_optim.state import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    SHARDED_MANIFEST_NAME,
    CheckpointError,
    LoadReport,
    ShardedStateInfo,
    StateInfo,
    consolidate_state,
    has_sharded_state,
    has_state,
    load_object_state,
    load_state_dict,
    register_json_type,
    save_object_state,
    save_state,
    save_state_dict,
)

# --- lazily imported integrations: name -> module ---
_LAZY: dict[str, str] = {
    # transformers Trainer with safetensors checkpoints
    "Trainer": "hf_optim.integrations.transformers.trainer",
    "TrainerMixin": "hf_optim.integrations.transformers.trainer",
    # Accelerate loops (prepare, item-normalised accumulation, safetensors checkpoints)
    "ItemNormalizer": "hf_optim.integrations.accelerate",
    "accelerate_load_state": "hf_optim.integrations.accelerate",
    "accelerate_prepare": "hf_optim.integrations.accelerate",
    "accelerate_save_state": "hf_optim.integrations.accelerate",
    "use_safetensors_state": "hf_optim.integrations.accelerate",
}


__all__ = [
    "ACCUMULATOR_NAME",
    "OPTIMIZER_INDEX_NAME",
    "OPTIMIZER_NAME",
    "SCHEDULER_NAME",
    "SHARDED_MANIFEST_NAME",
    "AdamW",
    "AdamWeightDecay",
    "BertAdam",
    "CheckpointError",
    "GradientAccumulator",
    "HfUrl",
    "ItemNormalizer",
    "LoadReport",
    "OpenAIAdam",
    "OptimizerInfo",
    "SchedulerInfo",
    "ShardedStateInfo",
    "StateInfo",
    "Trainer",
    "TrainerMixin",
    "__version__",
    "accelerate_load_state",
    "accelerate_prepare",
    "accelerate_save_state",
    "adam_weight_decay",
    "adamw",
    "add_registry_listener",
    "bert_adam",
    "consolidate_state",
    "create_optimizer",
    "create_scheduler",
    "download_checkpoint",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_decay_parameter_names",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_no_decay_parameter_names",
    "get_optimizer_info",
    "get_polynomial_decay_schedule_with_warmup",
    "get_scheduler",
    "get_scheduler_info",
    "get_wsd_schedule",
    "group_parameters",
    "has_sharded_state",
    "has_state",
    "inspect_state",
    "list_optimizers",
    "list_schedulers",
    "load_object_state",
    "load_state",
    "load_state_dict",
    "logging",
    "openai_adam",
    "optimizer_name",
    "parse_hf_url",
    "push_state_to_hub",
    "register_json_type",
    "register_optimizer",
    "register_scheduler",
    "remove_registry_listener",
    "resolve_state_dir",
    "save_object_state",
    "save_state",
    "save_state_dict",
    "scheduler_from_config",
    "use_safetensors_state",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# --- register hf_optim's names with transformers once it is (or if it already is) imported ---
# Installs an import hook only; never imports transformers itself.
from hf_optim import _autoload  # noqa: E402

_autoload.install()
_autoload.sync_if_loaded()
