"""The in-memory checkpoint model every layout's reader decodes its files into, and the load report.

A load runs in three steps, as ``torch.distributed.checkpoint`` splits planning from storage:

1. a layout's :class:`Reader` decodes its files into a :class:`SavedCheckpoint` (param groups, each parameter's
   state with :class:`TensorEntry` placeholders where tensors go, the scheduler and accumulator parts);
2. :func:`hf_optim.state.plan.check` compares it with the live objects and returns a plan (or raises, changing
   nothing); the reader then reads only the tensors the plan needs, laid out like the live tensors;
3. :func:`hf_optim.state.plan.apply` installs the plan and the tensors, or restores everything.

Only step 1 and the tensor reads know a layout: single-process files (:mod:`hf_optim.state.describe`), FSDP2
shards (:mod:`hf_optim.state.sharded`), and any other whose chunks are boxes or flat element ranges of the
flattened tensor (:class:`Chunk`): the chunk records are the reader's own, the check never looks at them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "Chunk",
    "LoadReport",
    "Reader",
    "SavedAccumulator",
    "SavedCheckpoint",
    "SavedGroup",
    "SavedParam",
    "SavedScheduler",
    "TensorEntry",
    "placeholders",
    "tensor_entries",
]


@dataclass(frozen=True)
class Chunk:
    """Where one piece of a saved tensor is: ``file`` and a box (``offsets``, ``sizes`` per dimension), or with
    ``flat=True`` the element range ``[offsets[0], offsets[0] + sizes[0])`` of the flattened tensor."""

    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    flat: bool = False


@dataclass(frozen=True)
class TensorEntry:
    """A saved tensor not read yet: its key in the layout, global shape, dtype and (if the layout has them) its
    chunks. ``like``: the name of the parameter the layout places it like (its own parameter for sharded
    optimizer state; a model parameter for an accumulator's gradient): it must have that parameter's shape.
    None when the layout stores whole tensors of any shape (the single-process files)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...] = ()
    like: str | None = None


@dataclass
class SavedParam:
    """One saved parameter: ``key`` (its name, or its index as a string), and its state with
    :class:`TensorEntry` where tensors go (``None``: the checkpoint holds no state for it)."""

    key: str
    name: str | None = None
    index: int | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None  #: ``dtype_name`` of the parameter when saved
    state: dict[str, Any] | None = None


@dataclass
class SavedGroup:
    hyperparameters: dict[str, Any]  #: decoded values (no placeholders)
    params: list[SavedParam]


@dataclass
class SavedScheduler:
    source: str  #: file named in messages
    state: dict[str, Any]
    class_name: str | None = None
    name: str | None = None  #: hf_optim schedule name
    kwargs: Any = None


@dataclass
class SavedAccumulator:
    source: str
    state: dict[str, Any]  #: ``state_dict()`` with :class:`TensorEntry` in ``gradients``
    class_name: str | None = None


@dataclass
class SavedCheckpoint:
    """What a checkpoint holds, decoded from any layout. ``scheduler`` and ``accumulator`` are read on demand
    (a load without a scheduler never reads the scheduler's file); they return None when the checkpoint has
    none."""

    source: str  #: the file that names the checkpoint in messages (its manifest)
    directory: str
    checkpoint_id: str
    optimizer_class: str | None
    keyed_by: str  #: "name" or "index"
    groups: list[SavedGroup]
    extra: dict[str, Any] = field(default_factory=dict)  #: other ``optimizer.state_dict()`` keys
    scheduler: Callable[[], SavedScheduler | None] = lambda: None
    accumulator: Callable[[], SavedAccumulator | None] = lambda: None
    #: tensors placed like a model parameter that are not optimizer state (an accumulator's gradients): checked
    #: against the model on every load, read only into an accumulator
    laid_out_like: tuple[TensorEntry, ...] = ()
    #: what the scheduler's / accumulator's state is called in this layout (for "the checkpoint has no ...")
    scheduler_label: str = "scheduler state"
    accumulator_label: str = "accumulator state"

    @property
    def params(self) -> list[SavedParam]:
        return [p for group in self.groups for p in group.params]


class Reader(Protocol):
    """A layout's reader: :meth:`describe` the files, then :meth:`read` the tensors a checked plan needs."""

    def describe(self) -> SavedCheckpoint: ...

    def prepare(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> None:
        """Open and check whatever :meth:`read` will read (the processes agree on this step before a collective
        read)."""
        ...

    def read(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """The tensors of ``entries`` (key -> (entry, the live tensor to lay it out like, or None for a whole
        tensor)): a tensor laid out like a ``DTensor`` is a ``DTensor`` placed like it holding only this
        process's part. Raises :class:`~hf_optim.errors.CheckpointError` if the files changed since
        :meth:`describe`."""
        ...


def tensor_entries(value: Any) -> list[TensorEntry]:
    """Every :class:`TensorEntry` inside ``value`` (dicts, lists, tuples)."""
    out: list[TensorEntry] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, TensorEntry):
            out.append(v)
        elif isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def placeholders(value: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """``value`` with each :class:`TensorEntry` replaced by ``tensors[key]``, or (``tensors=None``) by an empty
    ``meta`` tensor of its shape and dtype, for the checks."""
    if isinstance(value, TensorEntry):
        if tensors is None:
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        return tensors[value.key]
    if isinstance(value, dict):
        return {k: placeholders(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [placeholders(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(placeholders(v, tensors) for v in value)
    return value


@dataclass(frozen=True, repr=False)
class LoadReport:
    """What a load restored and what it skipped (with ``strict=False``); the same for every layout.

    :func:`hf_optim.load_state` returns it, so a resumed run can check (or log) that nothing was left behind:
    ``report.complete`` is True when nothing was skipped.

    Args:
        source: The local directory the checkpoint was read from.
        checkpoint_id: The checkpoint's id (from its metadata).
        loaded: Parameters whose optimizer state was restored (names, or indices as strings).
        missing: Optimizer parameters the checkpoint has no record of.
        unexpected: Checkpoint parameters the optimizer does not have.
        mismatched: Parameters on both sides but skipped (another shape, or state that differs from the state
            the optimizer already has).
        param_groups_restored: Whether the param groups' hyperparameters were restored.
        scheduler_loaded: Whether the scheduler's state was loaded.
        accumulator_loaded: Whether the accumulator's state was loaded.
        notes: Explanations of what was skipped.
        scheduler_skipped: A scheduler was passed but its state was not loaded.
        accumulator_skipped: An accumulator was passed but its state was not loaded.
        scheduler_mismatch: Schedule arguments that differ between checkpoint and live scheduler:
            name -> (saved, live).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 2)
        hf_optim.save_state("ckpt", hf_optim.AdamW(model.parameters()), model=model)
        report = hf_optim.load_state("ckpt", hf_optim.AdamW(model.parameters()), model=model)
        assert report.complete and sorted(report.loaded) == ["bias", "weight"]
        ```
    """

    source: str  #: local directory the checkpoint was read from
    checkpoint_id: str
    loaded: tuple[str, ...] = ()  #: parameters whose optimizer state was restored (names, or indices as str)
    missing: tuple[str, ...] = ()  #: optimizer parameters the checkpoint has no record of
    unexpected: tuple[str, ...] = ()  #: checkpoint parameters the optimizer does not have
    #: present on both sides but skipped: a different parameter shape, or saved state whose keys or tensor
    #: shapes differ from the state the optimizer already has for the parameter (that state is kept)
    mismatched: tuple[str, ...] = ()
    param_groups_restored: bool = False
    scheduler_loaded: bool = False
    accumulator_loaded: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    scheduler_skipped: bool = False  #: a scheduler was passed but its state was not loaded (see ``notes``)
    accumulator_skipped: bool = False  #: an accumulator was passed but its state was not loaded
    #: schedule arguments that differ between the checkpoint and the live scheduler: name -> (saved, live)
    scheduler_mismatch: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when nothing was skipped."""
        return (
            not (self.missing or self.unexpected or self.mismatched)
            and self.param_groups_restored
            and not (self.scheduler_skipped or self.accumulator_skipped)
        )

    def __repr__(self) -> str:
        parts = [f"source={self.source!r}", f"complete={self.complete}", f"loaded={len(self.loaded)}"]
        for name in ("missing", "unexpected", "mismatched", "notes"):
            if getattr(self, name):
                parts.append(f"{name}={len(getattr(self, name))}")
        parts += [
            f"scheduler_loaded={self.scheduler_loaded}",
            f"accumulator_loaded={self.accumulator_loaded}",
        ]
        if self.scheduler_mismatch:
            parts.append(f"scheduler_mismatch={sorted(self.scheduler_mismatch)}")
        return f"LoadReport({', '.join(parts)})"
