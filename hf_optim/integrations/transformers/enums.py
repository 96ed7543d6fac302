"""Adding members to transformers' str enums (``OptimizerNames``, ``SchedulerType``) at run time.

Python enums have no API for that: a member is created with the enum's own ``__new__`` and entered in the three
lookup tables (``_member_map_``, ``_value2member_map_``, ``_member_names_``), then checked; a member that does
not work is rolled back. Errors name the transformers version (:func:`integration_error`).
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

from hf_optim.errors import TransformersIntegrationError

__all__ = ["add_enum_member", "check_enum", "integration_error", "member_name", "transformers_version"]


def transformers_version() -> str:
    """The version of the transformers that is imported (else installed), or ``"unknown"``."""
    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("transformers")
        except Exception:
            version = "unknown"
    return str(version)


def integration_error(what: str) -> TransformersIntegrationError:
    """The error for transformers internals that are not what hf_optim expects (names both versions)."""
    from hf_optim import __version__

    return TransformersIntegrationError(
        f"hf_optim {__version__} cannot register its names with transformers {transformers_version()}: {what}. "
        "transformers' internals changed in this release; please report it to hf_optim "
        "(meanwhile pass the optimizer to Trainer(optimizers=(optimizer, scheduler)) instead of by name)."
    )


def member_name(enum_cls: type[Enum], value: str) -> str:
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


def check_enum(enum_cls: object, label: str) -> type[Enum]:
    """``enum_cls`` if it is a str ``Enum`` with the lookup tables this module edits, else the integration error."""
    if not (isinstance(enum_cls, type) and issubclass(enum_cls, Enum) and issubclass(enum_cls, str)):
        raise integration_error(f"{label} is not a str Enum")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            raise integration_error(f"{label} has no {attr}")
    return enum_cls


def add_enum_member(enum_cls: type[Enum], value: str) -> Enum:
    """Add ``value`` to the str enum ``enum_cls`` (or return the existing member); checked afterwards."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = member_name(enum_cls, value)
    member_type = getattr(enum_cls, "_member_type_", str)
    new_member: Callable[..., Any] = getattr(enum_cls, "_new_member_", None) or member_type.__new__
    member: Any = new_member(enum_cls, value)  # not a member yet: Enum's private attributes are set below
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
        raise integration_error(f"adding {value!r} to {enum_cls.__name__} did not produce a working member")
    return member
