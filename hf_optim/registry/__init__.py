"""Name registries for optimizers and learning-rate schedules (in the spirit of timm's ``_optim_factory``).

Each entry is a small frozen record (:class:`OptimizerInfo`, :class:`SchedulerInfo`) held by a
:class:`Registry`; the module-level functions (``register_optimizer``, ``create_optimizer``, ``get_scheduler``,
...) act on the default instance, :data:`default_registry`. :func:`create_optimizer` turns a model into decay /
no-decay parameter groups and maps the common arguments (``lr``, ``weight_decay``, ``betas``, ``eps``) to the
optimizer's own names; :func:`create_scheduler` builds a schedule and records how to rebuild it
(``hf_optim_config``).

Optimizers of other libraries come from *providers* (:meth:`Registry.add_optimizer_provider`): entries looked
up by name, listed with their ``source``. ``hf_optim.integrations.transformers`` adds one for transformers' own
``optim`` names (``adamw_torch``, ``sgd``, ``adafactor``, ...) when transformers is imported; the registry only
imports transformers (if installed, inside a function) when a name is not its own or when listing every source.
Listeners added with :func:`add_registry_listener` hear about every registered entry (the transformers
integration uses this to extend ``OptimizerNames`` / ``SchedulerType``).

Modules: :mod:`~hf_optim.registry.records` (the frozen records, provider protocol, introspection),
:mod:`~hf_optim.registry.core` (the :class:`Registry` class), :mod:`~hf_optim.registry.builtin` (the built-in
entries, grouped ``register_*`` functions).
"""

from __future__ import annotations

from hf_optim.registry.builtin import register_builtin
from hf_optim.registry.core import Listener, Registry, RegistryKind
from hf_optim.registry.records import (
    COMMON_OPTIMIZER_ARGS,
    HF_OPTIM_SOURCE,
    OptimizerInfo,
    OptimizerProvider,
    SchedulerInfo,
    accepts_argument,
    keyword_parameters,
    signature_of,
)

__all__ = [
    "COMMON_OPTIMIZER_ARGS",
    "HF_OPTIM_SOURCE",
    "Listener",
    "OptimizerInfo",
    "OptimizerProvider",
    "Registry",
    "RegistryKind",
    "SchedulerInfo",
    "accepts_argument",
    "add_optimizer_provider",
    "add_registry_listener",
    "create_optimizer",
    "create_scheduler",
    "default_registry",
    "get_optimizer_info",
    "get_scheduler",
    "get_scheduler_info",
    "keyword_parameters",
    "list_optimizers",
    "list_schedulers",
    "optimizer_name",
    "register_optimizer",
    "register_scheduler",
    "remove_optimizer_provider",
    "remove_registry_listener",
    "scheduler_from_config",
    "signature_of",
    "snapshot",
]

#: The registry behind hf_optim's module-level functions.
default_registry = Registry()
register_builtin(default_registry)

register_optimizer = default_registry.register_optimizer
register_scheduler = default_registry.register_scheduler
add_registry_listener = default_registry.add_listener
add_optimizer_provider = default_registry.add_optimizer_provider
remove_optimizer_provider = default_registry.remove_optimizer_provider
remove_registry_listener = default_registry.remove_listener
snapshot = default_registry.snapshot
list_optimizers = default_registry.list_optimizers
list_schedulers = default_registry.list_schedulers
get_optimizer_info = default_registry.get_optimizer_info
get_scheduler_info = default_registry.get_scheduler_info
optimizer_name = default_registry.optimizer_name
create_optimizer = default_registry.create_optimizer
create_scheduler = default_registry.create_scheduler
get_scheduler = default_registry.get_scheduler
scheduler_from_config = default_registry.scheduler_from_config
