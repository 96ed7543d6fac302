"""Register hf_optim's optimizer and schedule names with transformers' ``TrainingArguments`` and ``Trainer``.

transformers (5.x) validates ``TrainingArguments.optim`` against the ``OptimizerNames`` enum, dispatches through
the private dict ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` and builds schedules from
``transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION`` keyed by ``SchedulerType``. There is no plugin API, so
this module adds enum members and table entries, idempotently. Names transformers already has stay
transformers' own (hf_optim never replaces them). Every step checks the internals it relies on first and, if
they changed, raises :class:`TransformersIntegrationError` naming the transformers version (``register``) or
logs it once as a warning (``sync``, used by import hooks, which must never raise).

Nothing here imports transformers at module level: the transformers modules are taken from ``sys.modules`` once
they are fully imported (``sync``) or imported explicitly (``register``).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hf_optim.errors import TransformersIntegrationError

logger = logging.getLogger(__name__)

TRAINING_ARGS = "transformers.training_args"
TRAINER_UTILS = "transformers.trainer_utils"
TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
OPTIMIZATION = "transformers.optimization"

_lock = threading.RLock()
_listener_added = False
_warned: set[str] = set()
# Values of the enum members hf_optim created (transformers' own members are never touched).
_OUR_OPTIMIZERS: set[str] = set()
_OUR_SCHEDULERS: set[str] = set()


def transformers_version() -> str:
    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("transformers")
        except Exception:
            version = "unknown"
    return str(version)


def _error(what: str) -> TransformersIntegrationError:
    from hf_optim import __version__

    return TransformersIntegrationError(
        f"hf_optim {__version__} cannot register its names with transformers {transformers_version()}: {what}. "
        "transformers' internals changed in this release; please report it to hf_optim "
        "(meanwhile pass the optimizer to Trainer(optimizers=(optimizer, scheduler)) instead of by name)."
    )


# --------------------------------------------------------------------------------------------------------------
# Enum members added at run time
# --------------------------------------------------------------------------------------------------------------


def _member_name(enum_cls: type[Enum], value: str) -> str:
    """An unused member name for ``value``: its upper-cased identifier form, prefixed ``HF_OPTIM_`` and then
    numbered (``_2``, ``_3``, ...) while another member or attribute has it (``adamw-hf`` and ``adamw.hf`` both
    give ``ADAMW_HF``)."""
    base = re.sub(r"\W", "_", value).upper()
    if not base or base[0].isdigit():
        base = f"_{base}"
    candidates = itertools.chain(
        [base, f"HF_OPTIM_{base}"], (f"HF_OPTIM_{base}_{i}" for i in itertools.count(2))
    )
    return next(
        name for name in candidates if name not in enum_cls.__members__ and not hasattr(enum_cls, name)
    )


def _check_enum(enum_cls: object, label: str) -> type[Enum]:
    if not (isinstance(enum_cls, type) and issubclass(enum_cls, Enum) and issubclass(enum_cls, str)):
        raise _error(f"{label} is not a str Enum")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            raise _error(f"{label} has no {attr}")
    return enum_cls


def add_enum_member(enum_cls: type[Enum], value: str) -> Enum:
    """Add ``value`` to the str enum ``enum_cls`` (or return the existing member); checked afterwards."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = _member_name(enum_cls, value)
    member_type = getattr(enum_cls, "_member_type_", str)
    new_member = getattr(enum_cls, "_new_member_", None) or member_type.__new__
    member = new_member(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(next(iter(enum_cls), None), "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to (re)assign member names.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    try:
        ok = enum_cls(value) is member and enum_cls[name] is member and member in list(enum_cls)
    except Exception:
        ok = False
    if not ok:
        type.__delattr__(enum_cls, name)
        enum_cls._member_map_.pop(name, None)
        enum_cls._value2member_map_.pop(value, None)
        if name in enum_cls._member_names_:
            enum_cls._member_names_.remove(name)
        raise _error(f"adding {value!r} to {enum_cls.__name__} did not produce a working member")
    return member


# --------------------------------------------------------------------------------------------------------------
# optim_args: typed parsing against the optimizer's own signature
# --------------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _annotation_text(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else repr(annotation)


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected a boolean (true/false)")


def _guess(raw: str) -> Any:
    low = raw.strip().lower()
    if low in {"true", "false"}:
        return low == "true"
    if low in {"none", "null"}:
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number") from None


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected an integer") from None


def _to_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in re.split(r"[:;]", text))
    except ValueError:
        raise ValueError("expected numbers separated by ':' (e.g. 0.9:0.999)") from None


def convert_optim_arg(raw: str, parameter: inspect.Parameter | None) -> Any:
    """Convert one ``optim_args`` string to the type the optimizer's parameter expects.

    The type comes from the parameter's annotation, else its default: bool (true/false/1/0/yes/no), float, int,
    tuple of floats (``0.9:0.999``), list of strings (``a;b``), ``none`` for optional arguments, else a string.
    Without a parameter (the optimizer takes ``**kwargs``) the value is guessed (bool, int, float, string).
    """
    if parameter is None:
        return _guess(raw)
    default = parameter.default
    ann = _annotation_text(parameter.annotation)
    text = raw.strip()
    optional = default is None or "None" in ann or "Optional" in ann
    if optional and text.lower() in {"none", "null"}:
        return None
    if ann:
        if re.search(r"\bbool\b", ann):
            return _parse_bool(text)
        if re.match(r"(typing\.)?(tuple|Tuple)\[float", ann):
            return _to_floats(text)
        if re.search(r"Sequence|Iterable|\blist\b|\bList\b|tuple\[str", ann):
            return [part for part in text.split(";") if part]
        if re.search(r"\bfloat\b", ann):
            return _to_float(text)
        if re.search(r"\bint\b", ann):
            return _to_int(text)
        if re.search(r"\bstr\b", ann):
            return raw
    if isinstance(default, bool):
        return _parse_bool(text)
    if isinstance(default, tuple):
        return _to_floats(text)
    if isinstance(default, int):
        return _guess_number(text)
    if isinstance(default, float):
        return _to_float(text)
    if isinstance(default, str):
        return raw
    return _guess(raw)


def _guess_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return _to_float(text)


def parse_optim_args(optim_args: Mapping[str, str], info: Any) -> dict[str, Any]:
    """Typed ``optim_args`` for the registry entry ``info``, keyed by the optimizer's own argument names.

    Keys are the optimizer's arguments (``correct_bias``, ``epsilon``, ...); the common names ``lr``,
    ``weight_decay``, ``betas``, ``eps`` are accepted too and renamed like ``create_optimizer`` does. Unknown keys
    raise ``ValueError`` listing the valid ones.
    """
    from hf_optim.registry import _keyword_params, _signature

    optimizer = info.name
    signature = _signature(info.factory)
    takes_kwargs = signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    named = {p.name: p for p in _keyword_params(signature)} if signature is not None else {}
    parsed: dict[str, Any] = {}
    for key, raw in optim_args.items():
        if key == "params":
            raise ValueError("optim_args cannot set 'params': Trainer builds the parameter groups")
        own = info.arg_names.get(key, key) if key not in named else key
        targets = own if isinstance(own, tuple) else (own,)
        missing = [t for t in targets if t not in named]
        if missing and not takes_kwargs:
            raise ValueError(
                f"optim_args: {key!r} is not an argument of optimizer {optimizer!r}; "
                f"valid keys: {', '.join(sorted(named))}"
            )
        try:
            if isinstance(own, tuple):
                values = convert_optim_arg(
                    raw, inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=())
                )
                if len(values) != len(own):
                    raise ValueError(f"expected {len(own)} numbers separated by ':'")
                parsed.update(zip(own, values, strict=True))
            else:
                parsed[own] = convert_optim_arg(raw, named.get(own))
        except ValueError as err:
            raise ValueError(f"optim_args: {key}={raw!r} for optimizer {optimizer!r}: {err}") from None
    return parsed


# --------------------------------------------------------------------------------------------------------------
# TrainingArguments -> optimizer arguments
# --------------------------------------------------------------------------------------------------------------

_KERAS_PATTERNS = ("include_in_weight_decay", "exclude_from_weight_decay")
# TrainingArguments values transformers gives every optimizer; betas / eps (adam_*) only go to Adam-like ones.
_UNIVERSAL_ARGS = ("lr", "weight_decay")


def map_training_arguments(args: Any, info: Any, lr: float | None = None) -> dict[str, Any]:
    """TrainingArguments' ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` under the
    registry entry's own argument names (``lr``/``learning_rate``, ``betas``/``beta_1``+``beta_2``,
    ``eps``/``epsilon``, ``weight_decay``/``weight_decay_rate``).

    ``lr`` and ``weight_decay`` go to every factory that accepts them, ``**kwargs`` and factories without a
    signature included; ``betas`` and ``eps`` only to factories that declare them (or map them in ``arg_names``),
    as transformers passes ``adam_*`` only to Adam-like optimizers.
    """
    from hf_optim.registry import _accepts, _map_common, _signature

    signature = _signature(info.factory)

    def takes(key: str) -> bool:
        if key in info.arg_names:
            return True
        if key in _UNIVERSAL_ARGS:
            return _accepts(signature, key)
        return signature is not None and key in signature.parameters and _accepts(signature, key)

    common = {
        "lr": args.learning_rate if lr is None else lr,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    return _map_common(info, {k: v for k, v in common.items() if takes(k)}, "TrainingArguments")


def _named_trainable(model: Any) -> list[tuple[str, Any]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _trainer_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer's decay / no-decay groups (its default ``get_decay_parameter_names``) with ``weight_decay``."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        import transformers.trainer as trainer_module
    decay = set(trainer_module.Trainer.get_decay_parameter_names(None, model))
    named = _named_trainable(model)
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def optimizer_handler(name: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    """A handler for ``_OPTIMIZER_HANDLERS``: ``handler(ctx) -> (optimizer class, kwargs)`` for the hf_optim
    optimizer registered as ``name`` (looked up at call time, so ``register_optimizer(..., overwrite=True)``
    takes effect).

    Argument precedence: ``optim_args`` > TrainingArguments > the registry entry's ``defaults``. Trainer keeps
    building its decay / no-decay groups (biases and norms without decay) and passes them to the class, except
    when ``optim_args`` sets ``include_in_weight_decay`` / ``exclude_from_weight_decay``: then one group of
    named parameters goes to the optimizer and its Keras name rule decides. A weight decay in ``optim_args``
    (``weight_decay`` or the optimizer's own name) replaces ``TrainingArguments.weight_decay`` in the decay group:
    the groups are then built here, by Trainer's default ``get_decay_parameter_names``.
    """

    def handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        from hf_optim.registry import _map_common, get_optimizer_info

        info = get_optimizer_info(name)
        factory = info.factory
        args = ctx.args
        lr = getattr(ctx, "optimizer_kwargs", {}).get("lr")
        kwargs = _map_common(info, info.defaults, "defaults")
        kwargs.update(map_training_arguments(args, info, lr))
        from_optim_args = parse_optim_args(getattr(ctx, "optim_args", None) or {}, info)
        kwargs.update(from_optim_args)
        own_weight_decay = info.arg_names.get("weight_decay", "weight_decay")
        weight_decay = from_optim_args.get(own_weight_decay, args.weight_decay)
        model = getattr(ctx, "model", None)

        keras_rule = any(kwargs.get(key) for key in _KERAS_PATTERNS)
        if keras_rule or own_weight_decay in from_optim_args:
            if model is None:
                what = "/".join(_KERAS_PATTERNS) if keras_rule else own_weight_decay
                raise ValueError(f"{name}: {what} in optim_args needs Trainer's model (to build the groups)")
            if keras_rule:
                kwargs["params"] = [{"params": _named_trainable(model), "weight_decay": weight_decay}]
            else:
                kwargs["params"] = _trainer_groups(model, weight_decay)

        if isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer):
            return factory, kwargs

        # A plain factory function: transformers' factory protocol calls `cls()(model, **kwargs)`.
        def make_factory() -> Callable[..., Any]:
            def build(opt_model: Any, **factory_kwargs: Any) -> Any:
                from hf_optim.registry import create_optimizer

                params = factory_kwargs.pop("params", None)
                if params is None:
                    params = _trainer_groups(opt_model, weight_decay)
                return create_optimizer(name, params, **factory_kwargs)

            return build

        return make_factory, kwargs

    handler.__name__ = f"hf_optim_handler_{name}"
    handler.__qualname__ = handler.__name__
    return handler


def schedule_function(name: str) -> Callable[..., Any]:
    """An entry for ``TYPE_TO_SCHEDULER_FUNCTION``: builds the hf_optim schedule ``name`` (a ``LambdaLR``
    carrying ``hf_optim_config``) from transformers' ``get_scheduler`` arguments."""

    def build(
        optimizer: Any,
        num_warmup_steps: int | None = None,
        num_training_steps: int | None = None,
        **kwargs: Any,
    ) -> Any:
        from hf_optim.registry import create_scheduler

        return create_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            **kwargs,
        )

    build.__name__ = f"hf_optim_schedule_{name}"
    build.__qualname__ = build.__name__
    return build


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def _complete(module_name: str, just_loaded: str | None) -> Any:
    """The module if it is fully imported (or is the one whose import just finished), else None."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    if module_name != just_loaded and getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def _warn_shadowed(kind: str, value: str) -> None:
    key = f"{kind}:{value}"
    if key not in _warned:
        _warned.add(key)
        logger.info(
            "hf_optim %s %r: transformers has its own %r, which stays in use in TrainingArguments",
            kind,
            value,
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
    enum_cls = _check_enum(
        getattr(enum_module, bridge.enum_name, None), f"{bridge.enum_module}.{bridge.enum_name}"
    )
    if value in enum_cls._value2member_map_ and value not in bridge.ours:
        _warn_shadowed(bridge.kind, value)
        return
    member = add_enum_member(enum_cls, value)
    bridge.ours.add(value)
    table_module = _complete(bridge.table_module, just_loaded)
    if table_module is None:
        return
    table = getattr(table_module, bridge.table_name, None)
    if not isinstance(table, dict):
        raise _error(f"{bridge.table_module}.{bridge.table_name} is missing or not a dict")
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
    from hf_optim.registry import add_registry_listener, list_optimizers, list_schedulers

    if not _listener_added:
        # Added before listing, so that no entry registered meanwhile is missed; its replay is skipped.
        add_registry_listener(_on_registry_entry)
        _listener_added = True
    for value in list_optimizers():
        _register(_BRIDGES["optimizer"], value, just_loaded)
    for value in list_schedulers():
        _register(_BRIDGES["scheduler"], value, just_loaded)


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
            raise _error("optimizer handlers could not be registered")


def _handler_registered(value: str) -> bool:
    module = sys.modules.get(TRAINER_OPTIMIZER)
    enum_cls = sys.modules[TRAINING_ARGS].OptimizerNames
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", {})
    return getattr(handlers.get(enum_cls(value)), "_hf_optim_name", None) == value


def registered_names() -> dict[str, list[str]]:
    """The optimizer and schedule names hf_optim added to transformers (for diagnostics)."""
    return {"optimizers": sorted(_OUR_OPTIMIZERS), "schedulers": sorted(_OUR_SCHEDULERS)}
