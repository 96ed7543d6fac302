"""``TrainingArguments.optim_args`` (``"key=value,key=value"``, values as strings) typed for an hf_optim optimizer.

Each value is converted to the type the optimizer's own parameter declares (annotation, else default), so that
``optim_args="correct_bias=false,betas=0.9:0.98"`` reaches the optimizer as ``False`` and ``(0.9, 0.98)``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

from hf_optim.registry import OptimizerInfo

__all__ = ["convert_optim_arg", "parse_optim_args"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _annotation_text(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    return annotation.__name__ if isinstance(annotation, type) else repr(annotation)


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


def parse_optim_args(optim_args: Mapping[str, str], info: OptimizerInfo) -> dict[str, Any]:
    """Typed ``optim_args`` for the registry entry ``info``, keyed by the optimizer's own argument names.

    Keys are the optimizer's arguments (``correct_bias``, ``epsilon``, ...); the common names ``lr``,
    ``weight_decay``, ``betas``, ``eps`` are accepted too and renamed like ``create_optimizer`` does. Unknown keys
    raise ``ValueError`` listing the valid ones.
    """
    optimizer = info.name
    takes_kwargs = info.takes_var_keyword()
    named = {p.name: p for p in info.keyword_parameters()}
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
