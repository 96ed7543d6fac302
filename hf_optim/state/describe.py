"""The single-process layout's reader: an open :class:`~hf_optim.state.reader.Checkpoint` decoded into the
checkpoint model (:mod:`hf_optim.state.model`), and its state tensors read whole or, for a ``DTensor``
parameter, only in the part this process holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state import sharded
from hf_optim.state.codec import check_tensor_nodes, decode, tensor_refs
from hf_optim.state.format import (
    ACCUMULATOR_NAME,
    KIND_ACCUMULATOR,
    KIND_SCHEDULER,
    METADATA_KEY,
    SCHEDULER_NAME,
    check_metadata,
)
from hf_optim.state.io import read_json, read_safetensors, read_tensors
from hf_optim.state.model import (
    SavedAccumulator,
    SavedCheckpoint,
    SavedGroup,
    SavedParam,
    SavedScheduler,
    TensorEntry,
)
from hf_optim.state.reader import Checkpoint

__all__ = ["FileReader"]


class FileReader:
    """Reader of an open single-process checkpoint (``optimizer.safetensors`` or an index with shards)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def describe(self) -> SavedCheckpoint:
        ckpt, meta = self.ckpt, self.ckpt.meta
        # values read now: hyperparameters, extra, and tensors stored for Python numbers; state tensors later
        eager = {
            ref["tensor"] for g in meta["param_groups"] for ref in tensor_refs({"dict": g["hyperparameters"]})
        }
        eager |= {ref["tensor"] for ref in tensor_refs({"dict": meta.get("extra") or {}})}
        for record in meta["state"].values():
            eager |= {ref["tensor"] for ref in tensor_refs({"dict": record}) if ref.get("python") is not None}
        eager |= {key for key, header in ckpt.entries.items() if not header.shape}  # step counters
        values: dict[str, Any] = dict(ckpt.read_tensors(eager))
        for key, header in ckpt.entries.items():
            if key not in values:
                values[key] = TensorEntry(key, tuple(header.shape), header.dtype)
        groups = []
        for g, group in enumerate(meta["param_groups"]):
            hyper = decode({"dict": group["hyperparameters"]}, values, f"{ckpt.path}: param group {g}")
            params = []
            for rec in group["params"]:
                key = rec["name"] if meta["keyed_by"] == "name" else str(rec["index"])
                node = meta["state"].get(key)
                state = (
                    None
                    if node is None
                    else {k: decode(v, values, f"{ckpt.path}: state of {key!r}") for k, v in node.items()}
                )
                shape = rec.get("shape")
                params.append(
                    SavedParam(
                        key=key,
                        name=rec.get("name"),
                        index=rec.get("index"),
                        shape=tuple(shape) if shape is not None else None,
                        dtype=rec.get("dtype"),
                        state=state,
                    )
                )
            groups.append(SavedGroup(hyper, params))
        extra = {
            k: decode(node, values, f"{ckpt.path}: optimizer.state_dict()[{k!r}]")
            for k, node in (meta.get("extra") or {}).items()
        }
        return SavedCheckpoint(
            source=ckpt.path,
            directory=ckpt.directory,
            checkpoint_id=ckpt.checkpoint_id,
            optimizer_class=(meta.get("optimizer") or {}).get("class"),
            keyed_by=meta["keyed_by"],
            groups=groups,
            extra=extra,
            scheduler=self.scheduler,
            accumulator=self.accumulator,
            scheduler_label=SCHEDULER_NAME,
            accumulator_label=ACCUMULATOR_NAME,
        )

    def scheduler(self) -> SavedScheduler | None:
        ckpt = self.ckpt
        f = ckpt.companion("scheduler")
        if f is None:
            return None
        doc = check_metadata(read_json(f), f.path, KIND_SCHEDULER)
        if doc["checkpoint_id"] != ckpt.checkpoint_id:
            raise CheckpointError(
                f"{f.path} records checkpoint id {doc['checkpoint_id']!r}, not {ckpt.checkpoint_id!r} like "
                f"{ckpt.manifest}"
            )
        for key in ("class", "name"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise CheckpointError(f"{f.path}: {key!r} must be a string or null")
        state = decode(doc.get("state_dict"), {}, f.path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{f.path}: state_dict is not a dictionary")
        kwargs = decode(doc.get("kwargs"), {}, f.path) if doc.get("name") is not None else None
        return SavedScheduler(f.path, state, doc.get("class"), doc.get("name"), kwargs)

    def accumulator(self) -> SavedAccumulator | None:
        f = self.ckpt.companion("accumulator")
        if f is None:
            return None
        st = read_safetensors(f)
        meta = check_metadata(st.metadata.get(METADATA_KEY), f.path, KIND_ACCUMULATOR)
        check_tensor_nodes(meta.get("state"), st.entries, f.path)
        if set(st.entries) != {r["tensor"] for r in tensor_refs(meta.get("state"))}:
            raise CheckpointError(f"{f.path}: the tensors in the file do not match its metadata")
        value = decode(meta.get("state"), read_tensors(st, list(st.entries)), f.path)
        if not isinstance(value, dict):
            raise CheckpointError(f"{f.path}: the accumulator state is not a dictionary")
        return SavedAccumulator(f.path, value, meta.get("class"))

    def prepare(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> None:
        """Nothing to open: every file was opened and checked with the checkpoint."""

    def read(self, entries: Mapping[str, tuple[TensorEntry, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        ckpt = self.ckpt
        local: dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = {}
        for key, (entry, like) in entries.items():
            if like is None:
                continue
            region = sharded.local_region(like)
            if region is not None and entry.shape == tuple(like.shape):
                local[key] = (like, *region)
        tensors = ckpt.read_tensors(entries.keys() - local.keys())
        parts = ckpt.read_regions({name: (offsets, sizes) for name, (_, offsets, sizes) in local.items()})
        tensors.update({name: sharded.like_parameter(parts[name], local[name][0]) for name in parts})
        return tensors
