"""Read pickled optimizer state_dicts written by pytorch-pretrained-bert, without that package or pickle's trust.

``torch.save(bert_adam.state_dict(), path)`` pickled the schedule object of every param group
(``pytorch_pretrained_bert.optimization.WarmupLinearSchedule`` ...). :func:`load_pickled_legacy_state_dict` reads
such a file with ``torch.load(weights_only=True)`` and an allow-list that maps exactly those schedule classes to
hf_optim's; any other class is refused, naming it. Each schedule is then rebuilt through its JSON form, which
checks its fields.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.schedules.pretrained_bert import SCHEDULE_CLASSES, LRSchedule

logger = logging.getLogger(__name__)

__all__ = ["LEGACY_SCHEDULE_MODULE", "load_pickled_legacy_state_dict"]

LEGACY_SCHEDULE_MODULE = "pytorch_pretrained_bert.optimization"
"""Where the pickled schedule classes were defined (``optimization_openai`` imported them from there)."""

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _allow_list() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    return [(cls, f"{LEGACY_SCHEDULE_MODULE}.{name}") for name, cls in SCHEDULE_CLASSES.items()]


def load_pickled_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The optimizer state_dict in the pickled legacy checkpoint ``path``, its schedules as hf_optim objects.

    Pass the result to ``hf_optim.BertAdam(...).load_state_dict`` (or ``OpenAIAdam``). Raises
    :class:`~hf_optim.errors.CheckpointError` naming the file for a missing or unreadable file, a class outside
    the legacy schedules (named in the message), or a schedule with unexpected fields.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_allow_list()):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = _GLOBAL_RE.search(str(err))
        what = f"class {match.group(1)}" if match else "content"
        raise CheckpointError(
            f"{path}: refusing {what}: only the schedule classes of {LEGACY_SCHEDULE_MODULE} "
            f"({', '.join(sorted(SCHEDULE_CLASSES))}), tensors and plain containers are allowed"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {err}") from None
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise CheckpointError(f"{path}: not an optimizer state_dict (no 'param_groups' list)")
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict):
            raise CheckpointError(f"{path}: param_groups[{i}] is not a dict")
        schedule = group.get("schedule")
        if isinstance(schedule, LRSchedule):
            try:
                group["schedule"] = LRSchedule.from_json_dict(_fields(schedule))
            except ValueError as err:
                raise CheckpointError(f"{path}: param_groups[{i}]['schedule']: {err}") from None
    logger.debug("read legacy optimizer state %s (%d param groups)", path, len(state_dict["param_groups"]))
    return state_dict


def _fields(schedule: LRSchedule) -> dict[str, Any]:
    """What unpickling put on ``schedule``, in the shape of its JSON form (``cycles`` only where it belongs).

    The class is the one the pickle named: a ``type`` among the pickled attributes (which the real classes do
    not have) would otherwise turn the schedule into another class, so it is refused.
    """
    fields = vars(schedule)
    if "type" in fields:
        raise ValueError(f"the pickled {type(schedule).__name__} carries a 'type' attribute of its own")
    return {"type": type(schedule).__name__, **fields}
