"""Name registries for optimizers and learning-rate schedules (in the spirit of timm's optimizer factory).

Each entry is a small frozen record. :func:`create_optimizer` turns a model into decay / no-decay parameter
groups and maps the common arguments (``lr``, ``weight_decay``, ``betas``, ``eps``) to the optimizer's own names;
:func:`create_scheduler` builds a schedule and records how to rebuild it (``hf_optim_config``). Listeners added
with :func:`add_registry_listener` hear about every entry (the transformers integration uses this to extend
``OptimizerNames`` / ``SchedulerType``).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from hf_optim import schedules
from hf_optim.optimizers import AdamW, AdamWeightDecay, BertAdam, OpenAIAdam
from hf_optim.param_groups import group_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "COMMON_OPTIMIZER_ARGS",
    "OptimizerInfo",
    "SchedulerInfo",
    "add_registry_listener",
    "create_optimizer",
    "create_scheduler",
    "get_optimizer_info",
    "get_scheduler_info",
    "list_optimizers",
    "list_schedulers",
    "optimizer_name",
    "register_optimizer",
    "register_scheduler",
    "remove_registry_listener",
]

COMMON_OPTIMIZER_ARGS = ("lr", "weight_decay", "betas", "eps")
_WEIGHT_DECAY_PATTERN_ARGS = ("include_in_weight_decay", "exclude_from_weight_decay")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

RegistryKind = Literal["optimizer", "scheduler"]
Listener = Callable[[RegistryKind, Any], None]


@dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer.

    ``factory(params, **kwargs)`` builds it (a ``torch.optim.Optimizer`` class or a function); ``defaults`` are
    keyword arguments applied before the caller's; ``arg_names`` maps the common names ``lr``, ``weight_decay``,
    ``betas``, ``eps`` to the factory's own (a tuple splits a sequence value, e.g. ``betas`` ->
    ``("beta_1", "beta_2")``); common names that are absent map to themselves.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    arg_names: Mapping[str, str | tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class SchedulerInfo:
    """A registered schedule: ``factory(optimizer, [num_warmup_steps], [num_training_steps], **kwargs)``."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


_lock = threading.RLock()
_OPTIMIZERS: dict[str, OptimizerInfo] = {}
_SCHEDULERS: dict[str, SchedulerInfo] = {}
_LISTENERS: list[Listener] = []


# ----------------------------------------------------------------------------------------------------------------
# Registration and listeners
# ----------------------------------------------------------------------------------------------------------------


def _check_name(name: Any, kind: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name must be a non-empty string of letters, digits, '_', '.', '-' (no spaces or wildcards), "
            f"got {name!r}"
        )
    return name


def _notify(kind: RegistryKind, info: Any, listeners: Iterable[Listener]) -> None:
    for listener in listeners:
        try:
            listener(kind, info)
        except Exception:
            logger.exception("hf_optim registry listener %r failed for %s %r", listener, kind, info.name)


def add_registry_listener(callback: Listener) -> Listener:
    """Call ``callback(kind, info)`` now for every registered entry and later for each new registration.

    A listener that raises is logged and otherwise ignored: it never breaks registration. Returns ``callback``.
    """
    if not callable(callback):
        raise ValueError(f"callback must be callable, got {callback!r}")
    with _lock:
        if callback not in _LISTENERS:
            _LISTENERS.append(callback)
        optimizers = list(_OPTIMIZERS.values())
        schedulers = list(_SCHEDULERS.values())
    for info in optimizers:
        _notify("optimizer", info, [callback])
    for info in schedulers:
        _notify("scheduler", info, [callback])
    return callback


def remove_registry_listener(callback: Listener) -> None:
    """Stop calling ``callback`` (no error if it was not registered)."""
    with _lock:
        if callback in _LISTENERS:
            _LISTENERS.remove(callback)


def _mapping(value: Mapping[str, Any] | None, argument: str) -> MappingProxyType:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{argument} must be a mapping with string keys, got {value!r}")
    return MappingProxyType(dict(value))


def register_optimizer(
    name: str,
    factory: Callable[..., torch.optim.Optimizer],
    *,
    description: str = "",
    defaults: Mapping[str, Any] | None = None,
    arg_names: Mapping[str, str | Sequence[str]] | None = None,
    overwrite: bool = False,
) -> OptimizerInfo:
    """Register ``factory`` (e.g. an optimizer class) as ``name``; an existing name raises unless ``overwrite``."""
    _check_name(name, "optimizer")
    if not callable(factory):
        raise ValueError(f"factory for optimizer {name!r} must be callable, got {factory!r}")
    names = dict(_mapping(arg_names, "arg_names"))
    for common, own in names.items():
        if common not in COMMON_OPTIMIZER_ARGS:
            raise ValueError(f"arg_names keys must be among {COMMON_OPTIMIZER_ARGS}, got {common!r}")
        if isinstance(own, str):
            continue
        if isinstance(own, Sequence) and own and all(isinstance(o, str) for o in own):
            names[common] = tuple(own)
        else:
            raise ValueError(f"arg_names[{common!r}] must be a name or a sequence of names, got {own!r}")
    info = OptimizerInfo(
        name=name,
        factory=factory,
        description=str(description),
        defaults=_mapping(defaults, "defaults"),
        arg_names=MappingProxyType(names),
    )
    with _lock:
        if name in _OPTIMIZERS and not overwrite:
            raise ValueError(f"optimizer {name!r} is already registered; pass overwrite=True to replace it")
        _OPTIMIZERS[name] = info
        listeners = list(_LISTENERS)
    _notify("optimizer", info, listeners)
    return info


def register_scheduler(
    name: str, factory: Callable[..., Any], *, description: str = "", overwrite: bool = False
) -> SchedulerInfo:
    """Register a schedule ``factory(optimizer, ...)`` as ``name``; an existing name raises unless ``overwrite``."""
    _check_name(name, "scheduler")
    if not callable(factory):
        raise ValueError(f"factory for scheduler {name!r} must be callable, got {factory!r}")
    info = SchedulerInfo(name=name, factory=factory, description=str(description))
    with _lock:
        if name in _SCHEDULERS and not overwrite:
            raise ValueError(f"scheduler {name!r} is already registered; pass overwrite=True to replace it")
        _SCHEDULERS[name] = info
        listeners = list(_LISTENERS)
    _notify("scheduler", info, listeners)
    return info


# ----------------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------------


def _filter(names: Iterable[str], pattern: str | Sequence[str] | None) -> list[str]:
    names = sorted(names)
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def list_optimizers(pattern: str | Sequence[str] | None = None) -> list[str]:
    """Sorted registered optimizer names, optionally filtered by shell-style wildcards (``"adam*"``)."""
    with _lock:
        return _filter(_OPTIMIZERS, pattern)


def list_schedulers(pattern: str | Sequence[str] | None = None) -> list[str]:
    """Sorted registered schedule names, optionally filtered by shell-style wildcards (``"cosine*"``)."""
    with _lock:
        return _filter(_SCHEDULERS, pattern)


def _unknown(kind: str, name: Any, registered: Iterable[str]) -> ValueError:
    registered = sorted(registered)
    close = difflib.get_close_matches(str(name), registered, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(registered)}")


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The record registered as ``name``; ``ValueError`` listing the closest names if there is none."""
    with _lock:
        info = _OPTIMIZERS.get(name) if isinstance(name, str) else None
        if info is None:
            raise _unknown("optimizer", name, _OPTIMIZERS)
        return info


def get_scheduler_info(name: str) -> SchedulerInfo:
    """The record registered as ``name``; ``ValueError`` listing the closest names if there is none."""
    with _lock:
        info = _SCHEDULERS.get(name) if isinstance(name, str) else None
        if info is None:
            raise _unknown("scheduler", name, _SCHEDULERS)
        return info


def optimizer_name(optimizer: Any) -> str | None:
    """The registry name of ``optimizer``: its ``hf_optim_name``, else the entry whose factory is its exact class.

    Wrappers that keep the real optimizer in ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``) are unwrapped.
    """
    seen = 0
    while optimizer is not None and seen < 8:
        name = getattr(optimizer, "__dict__", {}).get("hf_optim_name")
        if isinstance(name, str):
            return name
        with _lock:
            for info in _OPTIMIZERS.values():
                if info.factory is type(optimizer):
                    return info.name
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


# ----------------------------------------------------------------------------------------------------------------
# Creation
# ----------------------------------------------------------------------------------------------------------------


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: skip the checks
        return None


def _accepts(sig: inspect.Signature | None, argument: str) -> bool:
    if sig is None:
        return True
    param = sig.parameters.get(argument)
    if param is not None:
        return param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _keyword_params(sig: inspect.Signature) -> list[inspect.Parameter]:
    """Parameters after the first (params / optimizer) that can be passed by keyword."""
    params = list(sig.parameters.values())[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _map_common(info: OptimizerInfo, kwargs: Mapping[str, Any], argument: str) -> dict[str, Any]:
    """Rename ``lr``/``weight_decay``/``betas``/``eps`` in ``kwargs`` to the optimizer's own argument names."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        own = info.arg_names.get(key, key)
        if isinstance(own, tuple):
            if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(own):
                raise ValueError(
                    f"{argument}: {key} must be a sequence of {len(own)} values for optimizer {info.name!r} "
                    f"(mapped to {', '.join(own)}), got {value!r}"
                )
            pairs = list(zip(own, value, strict=True))
        else:
            pairs = [(own, value)]
        for own_name, own_value in pairs:
            if own_name in out:
                raise ValueError(
                    f"{argument}: {own_name!r} for optimizer {info.name!r} is given twice (as {key!r} and directly)"
                )
            out[own_name] = own_value
    return out


def _weight_decay(info: OptimizerInfo, kwargs: Mapping[str, Any], sig: inspect.Signature | None) -> float:
    own = info.arg_names.get("weight_decay", "weight_decay")
    if isinstance(own, tuple):
        own = own[0]
    if own in kwargs:
        value = kwargs[own]
    elif (
        sig is not None
        and own in sig.parameters
        and sig.parameters[own].default is not inspect.Parameter.empty
    ):
        value = sig.parameters[own].default
    else:
        value = 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"weight_decay must be a number, got {value!r}")
    return value


def create_optimizer(
    name: str, model_or_params: nn.Module | Iterable[Any], **kwargs: Any
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Given an ``nn.Module``, its trainable parameters are split by name into a decay group and a no-decay group
    (biases and normalisation weights, see :func:`hf_optim.param_groups.group_parameters`;
    ``include_in_weight_decay`` / ``exclude_from_weight_decay`` regexes override, with AdamWeightDecay's rule)
    and passed as named parameters. Anything else (parameters, named parameters, group dicts) is passed through.
    ``lr``, ``weight_decay``, ``betas`` and ``eps`` are renamed to the optimizer's own argument names. The result
    carries ``hf_optim_name = name``.
    """
    info = get_optimizer_info(name)
    sig = _signature(info.factory)
    merged = _map_common(info, info.defaults, "defaults")
    merged.update(_map_common(info, kwargs, "create_optimizer"))

    if isinstance(model_or_params, nn.Module):
        patterns = {arg: merged.pop(arg, None) for arg in _WEIGHT_DECAY_PATTERN_ARGS}
        params: Any = group_parameters(
            model_or_params,
            weight_decay=_weight_decay(info, merged, sig),
            include_in_weight_decay=patterns["include_in_weight_decay"],
            exclude_from_weight_decay=patterns["exclude_from_weight_decay"],
        )
    else:
        if isinstance(model_or_params, torch.Tensor):
            raise ValueError(
                "model_or_params must be an nn.Module or an iterable of parameters / (name, parameter) pairs / "
                "param-group dicts, got a single Tensor (wrap it in a list)"
            )
        params = model_or_params

    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = {p.name for p in _keyword_params(sig)}
        unknown = sorted(set(merged) - accepted)
        if unknown:
            raise ValueError(
                f"optimizer {name!r} does not accept argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
    optimizer = info.factory(params, **merged)
    try:
        optimizer.hf_optim_name = name
    except AttributeError:  # pragma: no cover - exotic factories returning slotted objects
        logger.warning("could not set hf_optim_name on %r", optimizer)
    return optimizer


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    **kwargs: Any,
) -> Any:
    """Build the schedule registered as ``name`` for ``optimizer``.

    ``num_warmup_steps`` / ``num_training_steps`` go only to schedules that take them; a schedule that requires
    an argument that is missing raises ``ValueError`` naming it, and so does an argument it does not take. The
    result carries ``hf_optim_config = {"name": name, "kwargs": {every argument but optimizer and last_epoch}}``.
    """
    info = get_scheduler_info(name)
    sig = _signature(info.factory)
    call: dict[str, Any] = {}
    for argument, value in (
        ("num_warmup_steps", num_warmup_steps),
        ("num_training_steps", num_training_steps),
    ):
        if value is not None and _accepts(sig, argument):
            call[argument] = value
    if sig is not None:
        unknown = sorted(k for k in kwargs if not _accepts(sig, k))
        if unknown:
            accepted = sorted(p.name for p in _keyword_params(sig))
            raise ValueError(
                f"scheduler {name!r} does not accept argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
            )
    call.update(kwargs)
    if sig is not None:
        for param in _keyword_params(sig):
            if param.default is inspect.Parameter.empty and param.name not in call:
                raise ValueError(f"scheduler {name!r} requires the argument {param.name}")
    described = {k: v for k, v in call.items() if k != "last_epoch"}
    if sig is not None:
        bound = sig.bind_partial(optimizer, **call)
        bound.apply_defaults()
        first = next(iter(sig.parameters))
        described = {}
        for key, value in bound.arguments.items():
            param = sig.parameters[key]
            if key in (first, "last_epoch") or param.kind is param.VAR_POSITIONAL:
                continue
            if param.kind is param.VAR_KEYWORD:
                described.update({k: v for k, v in value.items() if k != "last_epoch"})
            else:
                described[key] = value
    schedules.check_json(described)  # before the factory touches the optimizer's learning rates
    scheduler = info.factory(optimizer, **call)
    return schedules.attach_config(scheduler, name, described)


# ----------------------------------------------------------------------------------------------------------------
# Built-in entries
# ----------------------------------------------------------------------------------------------------------------


def _register_builtins() -> None:
    register_optimizer(
        "adamw_hf",
        AdamW,
        description="AdamW of transformers 4.x (legacy-exact, with correct_bias; decoupled decay after the update)",
    )
    register_optimizer(
        "adam_weight_decay",
        AdamWeightDecay,
        description="AdamWeightDecay of transformers 4.x TF (Keras Adam math, decay by parameter-name patterns)",
        arg_names={
            "lr": "learning_rate",
            "weight_decay": "weight_decay_rate",
            "betas": ("beta_1", "beta_2"),
            "eps": "epsilon",
        },
    )
    for name, factory, description in (
        ("linear", schedules.get_linear_schedule_with_warmup, "linear warmup, then linear decay to 0"),
        ("cosine", schedules.get_cosine_schedule_with_warmup, "linear warmup, then cosine decay to 0"),
        (
            "cosine_with_restarts",
            schedules.get_cosine_with_hard_restarts_schedule_with_warmup,
            "linear warmup, then num_cycles cosine decays with hard restarts",
        ),
        (
            "polynomial",
            schedules.get_polynomial_decay_schedule_with_warmup,
            "linear warmup, then polynomial decay (power) to lr_end",
        ),
        ("constant", schedules.get_constant_schedule, "constant learning rate"),
        ("constant_with_warmup", schedules.get_constant_schedule_with_warmup, "linear warmup, then constant"),
        ("inverse_sqrt", schedules.get_inverse_sqrt_schedule, "linear warmup, then 1/sqrt decay (timescale)"),
        (
            "cosine_with_min_lr",
            schedules.get_cosine_with_min_lr_schedule_with_warmup,
            "linear warmup, then cosine decay to min_lr or min_lr_rate",
        ),
        (
            "cosine_warmup_with_min_lr",
            schedules.get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
            "warmup from warmup_lr_rate, then cosine decay to min_lr or min_lr_rate",
        ),
        (
            "warmup_stable_decay",
            schedules.get_wsd_schedule,
            "warmup, constant phase, then decay (linear/cosine/1-sqrt) over num_decay_steps",
        ),
    ):
        register_scheduler(name, factory, description=description)


def _register_legacy() -> None:
    # pytorch-pretrained-bert's optimizers, whose lr schedule is built in (Adam's betas / eps are b1, b2, e)
    legacy_names = {"betas": ("b1", "b2"), "eps": "e"}
    register_optimizer(
        "bert_adam",
        BertAdam,
        description="BertAdam of pytorch-pretrained-bert (built-in schedule, per-tensor clipping, no bias correction)",
        arg_names=legacy_names,
    )
    register_optimizer(
        "openai_adam",
        OpenAIAdam,
        description="OpenAIAdam of pytorch-pretrained-bert (built-in schedule, decay of matrices after the update)",
        arg_names=legacy_names,
    )


_register_builtins()
_register_legacy()
