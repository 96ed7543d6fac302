"""hf_optim: legacy-exact optimizers, schedules and safetensors optimizer state for the Hugging Face ecosystem.

The core (optimizers, schedules, accumulation, serialization) depends only on torch, safetensors and
huggingface_hub. Every public name is imported on first use, so ``import hf_optim`` imports neither torch nor
the integrations with transformers and accelerate.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The 'hf_optim' library logger: its level (HF_OPTIM_VERBOSITY) and prefixed handler; the root logger is untouched.
from hf_optim import logging

# Every public name and the module that defines it. Imported on first use (PEP 562): ``import hf_optim`` costs
# no torch import (the local Hub server and the command line's quick answers start at once), and never imports
# transformers or accelerate (the integrations).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "hf_optim.optimizers": (
        "AdamW",
        "AdamWeightDecay",
        "adam_weight_decay",
        "adamw",
        "BertAdam",
        "OpenAIAdam",
        "bert_adam",
        "openai_adam",
    ),
    "hf_optim.accumulation": ("GradientAccumulator",),
    "hf_optim.param_groups": (
        "get_decay_parameter_names",
        "get_no_decay_parameter_names",
        "group_parameters",
    ),
    "hf_optim.registry": (
        "OptimizerInfo",
        "SchedulerInfo",
        "add_registry_listener",
        "create_optimizer",
        "create_scheduler",
        "get_optimizer_info",
        "get_scheduler",
        "get_scheduler_info",
        "list_optimizers",
        "list_schedulers",
        "optimizer_name",
        "register_optimizer",
        "register_scheduler",
        "remove_registry_listener",
        "scheduler_from_config",
    ),
    "hf_optim.schedules": (
        "get_constant_schedule",
        "get_constant_schedule_with_warmup",
        "get_cosine_schedule_with_warmup",
        "get_cosine_with_hard_restarts_schedule_with_warmup",
        "get_cosine_with_min_lr_schedule_with_warmup",
        "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        "get_inverse_sqrt_schedule",
        "get_linear_schedule_with_warmup",
        "get_polynomial_decay_schedule_with_warmup",
        "get_wsd_schedule",
    ),
    "hf_optim.hub": (
        "HfUrl",
        "download_checkpoint",
        "inspect_state",
        "load_state",
        "parse_hf_url",
        "push_state_to_hub",
        "resolve_state_dir",
    ),
    "hf_optim.state": (
        "ACCUMULATOR_NAME",
        "OPTIMIZER_INDEX_NAME",
        "OPTIMIZER_NAME",
        "SCHEDULER_NAME",
        "SHARDED_MANIFEST_NAME",
        "CheckpointError",
        "LoadReport",
        "ShardedStateInfo",
        "StateInfo",
        "consolidate_state",
        "has_sharded_state",
        "has_state",
        "load_object_state",
        "load_state_dict",
        "register_json_type",
        "save_object_state",
        "save_state",
        "save_state_dict",
    ),
    # transformers Trainer with safetensors checkpoints
    "hf_optim.integrations.transformers.trainer": ("Trainer", "TrainerMixin"),
    # Accelerate loops (prepare, item-normalised accumulation, safetensors checkpoints)
    "hf_optim.integrations.accelerate": (
        "ItemNormalizer",
        "accelerate_load_state",
        "accelerate_prepare",
        "accelerate_save_state",
        "use_safetensors_state",
    ),
}
_MODULE_OF: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}
# Public submodules: attributes of hf_optim (``hf_optim.state``) before anything imports them, as when every name
# was imported eagerly; any other submodule is one only once imported.
_SUBMODULES = (
    "accumulation",
    "errors",
    "hub",
    "integrations",
    "json_types",
    "optimizers",
    "param_groups",
    "registry",
    "schedules",
    "state",
)
# One name's first import at a time: threads that reach for names at once would otherwise meet in torch's import
# cycles and see half-imported modules. hf_optim's own modules import submodules of hf_optim, never these names,
# so a thread importing one of them never waits for this lock (tests/test_packaging.py).
_NAME_LOCK = threading.RLock()

__all__ = sorted([*_MODULE_OF, "__version__", "logging"])

if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS (tests/test_packaging.py)
    from hf_optim.accumulation import GradientAccumulator
    from hf_optim.hub import (
        HfUrl,
        download_checkpoint,
        inspect_state,
        load_state,
        parse_hf_url,
        push_state_to_hub,
        resolve_state_dir,
    )
    from hf_optim.integrations.accelerate import (
        ItemNormalizer,
        accelerate_load_state,
        accelerate_prepare,
        accelerate_save_state,
        use_safetensors_state,
    )
    from hf_optim.integrations.transformers.trainer import Trainer, TrainerMixin
    from hf_optim.optimizers import (
        AdamW,
        AdamWeightDecay,
        BertAdam,
        OpenAIAdam,
        adam_weight_decay,
        adamw,
        bert_adam,
        openai_adam,
    )
    from hf_optim.param_groups import (
        get_decay_parameter_names,
        get_no_decay_parameter_names,
        group_parameters,
    )
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


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; else a public submodule (``hf_optim.state``)."""
    module = _MODULE_OF.get(name)
    if module is None:
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _NAME_LOCK:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF) | set(_SUBMODULES))


# --- register hf_optim's names with transformers once it is (or if it already is) imported ---
# Installs an import hook only; never imports transformers itself.
from hf_optim import _autoload  # noqa: E402

_autoload.install()
_autoload.sync_if_loaded()
