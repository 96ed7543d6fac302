"""Name handling of the :class:`~hf_optim.registry.core.Registry`: wildcard filters, case-insensitive matches,
errors suggesting the closest names, and building an optimizer or a schedule from its record."""

from __future__ import annotations

import difflib
import enum
import fnmatch
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_optim import schedules
from hf_optim._utils import finite_number
from hf_optim.param_groups import group_parameters
from hf_optim.registry.records import OptimizerInfo, SchedulerInfo

logger = logging.getLogger("hf_optim.registry")

__all__ = [
    "PROVIDER_MODULES",
    "WEIGHT_DECAY_PATTERN_ARGS",
    "build_optimizer",
    "build_scheduler",
    "casefold_match",
    "decay_value",
    "described_arguments",
    "filter_names",
    "import_provider_library",
    "scheduler_name",
    "unknown_name",
]

WEIGHT_DECAY_PATTERN_ARGS = ("include_in_weight_decay", "exclude_from_weight_decay")
# Libraries whose import lets hf_optim's integration add their optimizer provider (hf_optim._autoload's hook
# runs hf_optim.integrations.transformers.sync after this module executed).
PROVIDER_MODULES = {"transformers": "transformers.trainer_optimizer"}


def filter_names(names: Iterable[str], pattern: str | Sequence[str] | None) -> list[str]:
    names = sorted(set(names))
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def unknown_name(
    kind: str, name: Any, registered: Iterable[str], candidates: Iterable[str] | None = None
) -> ValueError:
    """``ValueError`` for an unknown name, suggesting the closest ``candidates`` (default: ``registered``)."""
    registered = sorted(registered)
    by_lower: dict[str, str] = {}
    for candidate in sorted(candidates or registered):
        by_lower.setdefault(candidate.lower(), candidate)
    close = [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), by_lower, n=3, cutoff=0.5)]
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(registered)}")


def casefold_match(name: str, names: Iterable[str]) -> str | None:
    """The one name equal to ``name`` ignoring case, or ``None`` (none, or several differing only in case)."""
    matches = [n for n in names if n.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def decay_value(info: OptimizerInfo, kwargs: Mapping[str, Any]) -> float:
    """The weight decay the decay group gets: the caller's, else the factory's default, else 0."""
    own = info.own_name("weight_decay")
    if isinstance(own, tuple):
        own = own[0]
    sig = info.signature()
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
    return finite_number(value, "weight_decay")


def scheduler_name(name: Any) -> str:
    if isinstance(name, enum.Enum):  # transformers' SchedulerType is a str enum
        name = name.value
    if not isinstance(name, str):
        raise ValueError(f"name must be a scheduler name (str), got {name!r}")
    return name


def import_provider_library(source: str) -> None:
    """Import ``source``'s optimizer module if the library is installed, so that its provider gets added."""
    module = PROVIDER_MODULES.get(source)
    if module is None or module in sys.modules or importlib.util.find_spec(source) is None:
        return
    try:
        importlib.import_module(module)
    except Exception as err:  # a broken optional library must not break hf_optim's own names
        logger.debug("importing %s for its optimizer names failed: %r", module, err)


def described_arguments(
    sig: inspect.Signature | None, optimizer: Any, call: Mapping[str, Any]
) -> dict[str, Any]:
    """The arguments a schedule built with ``call`` is described by: every one, defaults applied, but the
    optimizer and ``last_epoch`` (the position, restored from the state instead)."""
    if sig is None:
        return {k: v for k, v in call.items() if k != "last_epoch"}
    bound = sig.bind_partial(optimizer, **call)
    bound.apply_defaults()
    first = next(iter(sig.parameters))
    described: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        param = sig.parameters[key]
        if key in (first, "last_epoch") or param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.VAR_KEYWORD:
            described.update({k: v for k, v in value.items() if k != "last_epoch"})
        else:
            described[key] = value
    return described


def build_optimizer(
    info: OptimizerInfo, name: str, model_or_params: nn.Module | Iterable[Any], kwargs: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """``Registry.create_optimizer`` once ``name``'s record is found."""
    merged = info.map_common(info.defaults, "defaults")
    merged.update(info.map_common(kwargs, "create_optimizer"))

    if isinstance(model_or_params, nn.Module):
        patterns = {arg: merged.pop(arg, None) for arg in WEIGHT_DECAY_PATTERN_ARGS}
        params: Any = group_parameters(
            model_or_params,
            weight_decay=decay_value(info, merged),
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

    if not info.takes_var_keyword():
        accepted = {p.name for p in info.keyword_parameters()}
        unknown = sorted(set(merged) - accepted)
        if unknown:
            raise ValueError(
                f"optimizer {name!r} does not accept argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
    optimizer = info.factory(params, **merged)
    try:
        optimizer.hf_optim_name = name  # type: ignore[attr-defined]  # hf_optim's tag on a torch object
    except AttributeError:  # pragma: no cover - exotic factories returning slotted objects
        logger.warning("could not set hf_optim_name on %r", optimizer)
    return optimizer


def build_scheduler(
    info: SchedulerInfo,
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None,
    num_training_steps: int | None,
    kwargs: Mapping[str, Any],
) -> Any:
    """``Registry.create_scheduler`` once ``name``'s record is found."""
    sig = info.signature()
    call: dict[str, Any] = {}
    for argument, value in (
        ("num_warmup_steps", num_warmup_steps),
        ("num_training_steps", num_training_steps),
    ):
        if value is not None and info.accepts(argument):
            call[argument] = value
    if sig is not None:
        unknown = sorted(k for k in kwargs if not info.accepts(k))
        if unknown:
            accepted = sorted(p.name for p in info.keyword_parameters())
            raise ValueError(
                f"scheduler {name!r} does not accept argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted)}"
            )
    call.update(kwargs)
    for param in info.keyword_parameters():
        if param.default is inspect.Parameter.empty and param.name not in call:
            raise ValueError(f"scheduler {name!r} requires the argument {param.name}")
    described = described_arguments(sig, optimizer, call)
    schedules.check_json(described)  # before the factory touches the optimizer's learning rates
    scheduler = info.factory(optimizer, **call)
    return schedules.attach_config(scheduler, name, described)
