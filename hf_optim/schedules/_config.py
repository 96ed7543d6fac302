"""The JSON description every hf_optim schedule carries (``hf_optim_config``): its registry name and arguments,
from which :func:`hf_optim.scheduler_from_config` rebuilds it without code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["attach_config", "check_json"]


def check_json(kwargs: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first scheduler argument that JSON cannot represent."""
    for key, value in kwargs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"scheduler argument {key}={value!r} is not JSON-serialisable: hf_optim records every argument so "
                "that the scheduler can be rebuilt from its JSON description"
            ) from None


def attach_config(scheduler: Any, name: str, kwargs: Mapping[str, Any]) -> Any:
    """Set ``scheduler.hf_optim_config = {"name": name, "kwargs": kwargs}``, checking that it is JSON."""
    kwargs = dict(kwargs)
    check_json(kwargs)
    scheduler.hf_optim_config = {"name": name, "kwargs": kwargs}
    return scheduler
