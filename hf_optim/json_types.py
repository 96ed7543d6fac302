"""Value types that layers below :mod:`hf_optim.state` declare for checkpoints, without importing it.

A module such as :mod:`hf_optim.schedules.pretrained_bert` calls :func:`declare_json_type` at import; the
checkpoint codec subscribes with :func:`on_json_type` and registers every declared type (those declared before it
subscribed, and those declared after). The codec's ``register_json_type`` stays the public entry point for users.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonType", "declare_json_type", "on_json_type"]


@dataclass(frozen=True)
class JsonType:
    """``cls`` saved as ``{"object": name, "json": to_json(value)}`` and rebuilt by ``from_json(json)``.

    ``from_json`` receives untrusted plain JSON and must validate it as the class's constructor does.
    """

    cls: type
    name: str
    to_json: Callable[[Any], dict]
    from_json: Callable[[dict], Any]


_declared: list[JsonType] = []
_listeners: list[Callable[[JsonType], None]] = []


def declare_json_type(
    cls: type, *, name: str, to_json: Callable[[Any], dict], from_json: Callable[[dict], Any]
) -> None:
    """Declare a checkpoint value type; every listener (the codec) is told now or when it subscribes."""
    entry = JsonType(cls, name, to_json, from_json)
    _declared.append(entry)
    for listener in list(_listeners):
        listener(entry)


def on_json_type(listener: Callable[[JsonType], None]) -> None:
    """Call ``listener`` for every type declared so far and for each one declared later."""
    _listeners.append(listener)
    for entry in list(_declared):
        listener(entry)
