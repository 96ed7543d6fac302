"""The registry's records: frozen :class:`OptimizerInfo` / :class:`SchedulerInfo` entries, the provider protocol
for other libraries' optimizers, signature introspection (the integrations map arguments with it) and the checks
of registration arguments."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

__all__ = [
    "COMMON_OPTIMIZER_ARGS",
    "HF_OPTIM_SOURCE",
    "OptimizerInfo",
    "OptimizerProvider",
    "SchedulerInfo",
    "accepts_argument",
    "check_arg_names",
    "check_mapping",
    "check_name",
    "keyword_parameters",
    "signature_of",
]

COMMON_OPTIMIZER_ARGS = ("lr", "weight_decay", "betas", "eps")
#: ``source`` of the entries registered in hf_optim's registry (built-in or by the user).
HF_OPTIM_SOURCE = "hf_optim"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------------------------------------------
# Signature introspection (public: the integrations map arguments with it)
# ----------------------------------------------------------------------------------------------------------------


def signature_of(factory: Callable[..., Any]) -> inspect.Signature | None:
    """``inspect.signature(factory)``, or ``None`` for callables without one (some builtins): checks are skipped."""
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def accepts_argument(sig: inspect.Signature | None, argument: str) -> bool:
    """Whether a callable with signature ``sig`` takes ``argument`` by keyword (``**kwargs`` counts; no
    signature: assumed yes)."""
    if sig is None:
        return True
    param = sig.parameters.get(argument)
    if param is not None:
        return param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def keyword_parameters(sig: inspect.Signature) -> list[inspect.Parameter]:
    """Parameters after the first (params / optimizer) that can be passed by keyword."""
    params = list(sig.parameters.values())[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class _FactoryIntrospection:
    """Signature helpers shared by the two records (their ``factory`` is introspected)."""

    factory: Callable[..., Any]

    def signature(self) -> inspect.Signature | None:
        """The factory's signature (``None`` if it has none)."""
        return signature_of(self.factory)

    def accepts(self, argument: str) -> bool:
        """Whether the factory takes ``argument`` by keyword (directly or through ``**kwargs``)."""
        return accepts_argument(self.signature(), argument)

    def takes_var_keyword(self) -> bool:
        """Whether the factory takes ``**kwargs`` (or has no signature): any argument name may be passed."""
        sig = self.signature()
        return sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    def keyword_parameters(self) -> list[inspect.Parameter]:
        """The factory's keyword-capable parameters after the first one (empty without a signature)."""
        sig = self.signature()
        return [] if sig is None else keyword_parameters(sig)


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class OptimizerInfo(_FactoryIntrospection):
    """A registered optimizer.

    ``factory(params, **kwargs)`` builds it (a ``torch.optim.Optimizer`` class or a function); ``defaults`` are
    keyword arguments applied before the caller's; ``arg_names`` maps the common names ``lr``, ``weight_decay``,
    ``betas``, ``eps`` to the factory's own (a tuple splits a sequence value, e.g. ``betas`` ->
    ``("beta_1", "beta_2")``); common names that are absent map to themselves. ``source`` says where the entry
    comes from: ``"hf_optim"`` for the registry's own entries, else the provider's library (``"transformers"``).
    Frozen: :func:`hf_optim.register_optimizer` makes it, :func:`hf_optim.get_optimizer_info` returns it.

    Args:
        name: The registered name.
        factory: Builds the optimizer: ``factory(params, **kwargs)``.
        description: One line for ``hf-optim list``.
        defaults: Keyword arguments applied before the caller's.
        arg_names: The factory's own names of ``lr``, ``weight_decay``, ``betas``, ``eps``.
        source: ``"hf_optim"`` or the providing library's name.

    Example:
        ```python
        import hf_optim

        info = hf_optim.get_optimizer_info("adamw_hf")
        assert (info.name, info.source, info.factory) == ("adamw_hf", "hf_optim", hf_optim.AdamW)
        ```
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=_empty_mapping)
    arg_names: Mapping[str, str | tuple[str, ...]] = field(default_factory=_empty_mapping)
    source: str = HF_OPTIM_SOURCE

    def own_name(self, common: str) -> str | tuple[str, ...]:
        """The factory's own name(s) for the common argument ``common`` (itself when not renamed)."""
        return self.arg_names.get(common, common)

    def map_common(self, kwargs: Mapping[str, Any], argument: str = "kwargs") -> dict[str, Any]:
        """``kwargs`` with ``lr``/``weight_decay``/``betas``/``eps`` renamed to the factory's own names.

        A tuple target splits the value (``betas=(0.9, 0.99)`` -> ``beta_1=0.9, beta_2=0.99``). ``ValueError``
        (prefixed by ``argument``) when a split value has the wrong length or a name arrives twice.
        """
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            own = self.own_name(key)
            if isinstance(own, tuple):
                if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(own):
                    raise ValueError(
                        f"{argument}: {key} must be a sequence of {len(own)} values for optimizer {self.name!r} "
                        f"(mapped to {', '.join(own)}), got {value!r}"
                    )
                pairs = list(zip(own, value, strict=True))
            else:
                pairs = [(own, value)]
            for own_name, own_value in pairs:
                if own_name in out:
                    raise ValueError(
                        f"{argument}: {own_name!r} for optimizer {self.name!r} is given twice "
                        f"(as {key!r} and directly)"
                    )
                out[own_name] = own_value
        return out


@dataclass(frozen=True)
class SchedulerInfo(_FactoryIntrospection):
    """A registered schedule: ``factory(optimizer, [num_warmup_steps], [num_training_steps], **kwargs)``.

    Frozen: :func:`hf_optim.register_scheduler` makes it, :func:`hf_optim.get_scheduler_info` returns it.

    Args:
        name: The registered name.
        factory: Builds the scheduler for an optimizer.
        description: One line for ``hf-optim list``.

    Example:
        ```python
        import hf_optim

        info = hf_optim.get_scheduler_info("cosine")
        assert info.factory is hf_optim.get_cosine_schedule_with_warmup
        ```
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""


class OptimizerProvider(Protocol):
    """Optimizers another library builds, looked up by name (they are not registry entries).

    ``source`` names the library; ``names()`` lists its optimizer names; ``info(name)`` returns an
    :class:`OptimizerInfo` (with that ``source``) or ``None`` for a name it does not have.
    """

    source: str

    def names(self) -> Iterable[str]: ...

    def info(self, name: str) -> OptimizerInfo | None: ...


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def check_name(name: Any, kind: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name must be a non-empty string of letters, digits, '_', '.', '-' (no spaces or wildcards), "
            f"got {name!r}"
        )
    return name


def check_mapping(value: Mapping[str, Any] | None, argument: str) -> MappingProxyType:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{argument} must be a mapping with string keys, got {value!r}")
    return MappingProxyType(dict(value))


def check_arg_names(arg_names: Mapping[str, str | Sequence[str]] | None) -> MappingProxyType:
    names = dict(check_mapping(arg_names, "arg_names"))
    for common, own in names.items():
        if common not in COMMON_OPTIMIZER_ARGS:
            raise ValueError(f"arg_names keys must be among {COMMON_OPTIMIZER_ARGS}, got {common!r}")
        if isinstance(own, str):
            continue
        if isinstance(own, Sequence) and own and all(isinstance(o, str) for o in own):
            names[common] = tuple(own)
        else:
            raise TypeError(f"arg_names[{common!r}] must be a name or a sequence of names, got {own!r}")
    return MappingProxyType(names)
