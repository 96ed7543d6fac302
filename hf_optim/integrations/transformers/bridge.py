"""The bridge between hf_optim's registry and transformers' name tables.

transformers (5.x) validates ``TrainingArguments.optim`` against the ``OptimizerNames`` enum, dispatches through
the private dict ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` and builds schedules from
``transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION`` keyed by ``SchedulerType``. There is no plugin API, so
:func:`sync` / :func:`register` add enum members (:mod:`.enums`) and table entries (:mod:`.handlers`),
idempotently, and give the registry a provider of transformers' own optimizer names (:mod:`.provider`). Names
transformers already has stay transformers' own (hf_optim never replaces them). Every step checks the internals
it relies on first and, if they changed, raises :class:`TransformersIntegrationError` naming the transformers
version (``register``) or logs it once as a warning (``sync``, used by import hooks, which must never raise).

Nothing here imports transformers at module level: the transformers modules are taken from ``sys.modules`` once
they are fully imported (``sync``) or imported explicitly (``register``).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_optim.errors import TransformersIntegrationError
from hf_optim.integrations.transformers.enums import add_enum_member, check_enum, integration_error
from hf_optim.integrations.transformers.handlers import optimizer_handler, schedule_function
from hf_optim.integrations.transformers.provider import TransformersOptimizers
from hf_optim.integrations.transformers.resume import patch_trainer_resume
from hf_optim.registry import (
    HF_OPTIM_SOURCE,
    add_optimizer_provider,
    add_registry_listener,
    list_optimizers,
    list_schedulers,
)

__all__ = ["register", "registered_names", "sync"]

logger = logging.getLogger(__name__)

TRAINING_ARGS = "transformers.training_args"
TRAINER_UTILS = "transformers.trainer_utils"
TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
OPTIMIZATION = "transformers.optimization"
TRAINER = "transformers.trainer"

_lock = threading.RLock()
_listener_added = False
_warned: set[str] = set()
# Values of the enum members hf_optim created (transformers' own members are never touched).
_OUR_OPTIMIZERS: set[str] = set()
_OUR_SCHEDULERS: set[str] = set()
_PROVIDER = TransformersOptimizers(_OUR_OPTIMIZERS)


def _complete(module_name: str, just_loaded: str | None) -> Any:
    """The module if it is fully imported (or is the one whose import just finished), else None."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    if module_name != just_loaded and getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _note_shadowed(kind: str, value: str) -> None:
    """Say once per name (at DEBUG) that ``TrainingArguments`` keeps transformers' meaning of ``value``."""
    key = f"{kind}:{value}"
    if key in _warned:
        return
    _warned.add(key)
    if kind == "optimizer":
        logger.debug(
            "optimizer name %r: transformers defines it too, so TrainingArguments(optim=%r) keeps transformers' "
            "entry; hf_optim.create_optimizer(%r, ...) builds hf_optim's",
            value,
            value,
            value,
        )
    else:
        logger.debug(
            "schedule name %r: transformers defines it too, so transformers' Trainer keeps its own entry; "
            "hf_optim's Trainer and hf_optim.get_scheduler build hf_optim's, with the same learning rates",
            value,
        )


@dataclass(frozen=True)
class _Bridge:
    """Where one kind of registry entry goes in transformers: an enum of names and a dispatch table."""

    kind: str  # "optimizer" / "schedule", for messages
    enum_module: str
    enum_name: str
    table_module: str
    table_name: str
    ours: set[str]  # names hf_optim added (transformers' own names are never replaced)
    make_entry: Callable[[str], Any]  # value -> the table's entry (handler / schedule function)


_BRIDGES = {
    "optimizer": _Bridge(
        "optimizer", TRAINING_ARGS, "OptimizerNames", TRAINER_OPTIMIZER, "_OPTIMIZER_HANDLERS", _OUR_OPTIMIZERS,
        optimizer_handler,
    ),
    "scheduler": _Bridge(
        "schedule", TRAINER_UTILS, "SchedulerType", OPTIMIZATION, "TYPE_TO_SCHEDULER_FUNCTION", _OUR_SCHEDULERS,
        schedule_function,
    ),
}  # fmt: skip


def _register(bridge: _Bridge, value: str, just_loaded: str | None) -> None:
    """Add ``value`` to the enum, then its entry to the dispatch table, as far as the modules are loaded."""
    enum_module = _complete(bridge.enum_module, just_loaded)
    if enum_module is None:
        return
    enum_cls = check_enum(
        getattr(enum_module, bridge.enum_name, None), f"{bridge.enum_module}.{bridge.enum_name}"
    )
    if value in enum_cls._value2member_map_ and value not in bridge.ours:
        _note_shadowed(bridge.kind, value)
        return
    member = add_enum_member(enum_cls, value)
    bridge.ours.add(value)
    table_module = _complete(bridge.table_module, just_loaded)
    if table_module is None:
        return
    table = getattr(table_module, bridge.table_name, None)
    if not isinstance(table, dict):
        raise integration_error(f"{bridge.table_module}.{bridge.table_name} is missing or not a dict")
    if getattr(table.get(member), "_hf_optim_name", None) != value:
        entry = bridge.make_entry(value)
        entry._hf_optim_name = value
        table[member] = entry


def _on_registry_entry(kind: str, info: Any) -> None:
    """Registry listener: a name registered after the first ``_sync`` reaches transformers too."""
    try:
        with _lock:
            # Not while add_registry_listener replays the existing entries: _sync registers those itself.
            if _listener_added and kind in _BRIDGES:
                _register(_BRIDGES[kind], info.name, None)
    except TransformersIntegrationError as err:
        _warn_once(err)


def _warn_once(err: Exception) -> None:
    text = str(err)
    if text not in _warned:
        _warned.add(text)
        logger.warning("%s", text)


def _sync(just_loaded: str | None) -> None:
    global _listener_added
    if not any(
        _complete(m, just_loaded) for m in (TRAINING_ARGS, TRAINER_UTILS, TRAINER_OPTIMIZER, OPTIMIZATION)
    ):
        return
    if not _listener_added:
        # Added before listing, so that no entry registered meanwhile is missed; its replay is skipped.
        add_registry_listener(_on_registry_entry)
        _listener_added = True
    add_optimizer_provider(_PROVIDER)
    for value in list_optimizers(source=HF_OPTIM_SOURCE):
        _register(_BRIDGES["optimizer"], value, just_loaded)
    for value in list_schedulers():
        _register(_BRIDGES["scheduler"], value, just_loaded)
    if _complete(TRAINER, just_loaded):
        patch_trainer_resume(sys.modules[TRAINER])


def sync(just_loaded: str | None = None) -> None:
    """Register every hf_optim name with the transformers modules that are already imported.

    Called by the import hook after each watched transformers module executed and by ``import hf_optim``. Never
    raises for changed transformers internals (logs a warning naming the transformers version instead).
    """
    with _lock:
        try:
            _sync(just_loaded)
        except TransformersIntegrationError as err:
            _warn_once(err)


def register() -> None:
    """Import the transformers modules involved and register every hf_optim name; raise
    :class:`TransformersIntegrationError` (naming the transformers version) if that is not possible."""
    import transformers.optimization
    import transformers.trainer_optimizer
    import transformers.trainer_utils
    import transformers.training_args  # noqa: F401

    with _lock:
        _sync(None)
        if _OUR_OPTIMIZERS and not all(_handler_registered(v) for v in _OUR_OPTIMIZERS):
            raise integration_error("optimizer handlers could not be registered")


def _handler_registered(value: str) -> bool:
    module = sys.modules.get(TRAINER_OPTIMIZER)
    enum_cls = sys.modules[TRAINING_ARGS].OptimizerNames
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", {})
    return getattr(handlers.get(enum_cls(value)), "_hf_optim_name", None) == value


def registered_names() -> dict[str, list[str]]:
    """The optimizer and schedule names hf_optim added to transformers (for diagnostics)."""
    return {"optimizers": sorted(_OUR_OPTIMIZERS), "schedulers": sorted(_OUR_SCHEDULERS)}
