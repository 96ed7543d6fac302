"""Saving DeepSpeed ZeRO state: each process writes its own partition, rank 0 the manifest (format version 3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from typing import Any

import torch
import torch.distributed as dist

from hf_optim._utils import unwrap_scheduler
from hf_optim.state.io import write_safetensors_streaming
from hf_optim.state.sharded import agree, barrier, broadcast_text, rank
from hf_optim.state.zero._format import (
    SHARDED_MANIFEST_NAME,
    encode_value,
    gather_text,
    manifest,
    partition_metadata,
    shard_file_name,
)
from hf_optim.state.zero._layout import ZeroLayout, engine_counters

logger = logging.getLogger(__name__)


def _scaler_state(zero: Any) -> dict[str, Any] | None:
    """The fp16 loss scaler's numbers (``cur_scale``, ``cur_iter``, ...), with its class name."""
    scaler = getattr(zero, "loss_scaler", None)
    if scaler is None:
        return None
    values = {
        k: v
        for k, v in vars(scaler).items()
        if not k.startswith("_") and isinstance(v, bool | int | float) and not isinstance(v, torch.Tensor)
    }
    return {"class": type(scaler).__qualname__, "state": encode_value(values, "loss_scaler", "loss_scaler")}


def save_zero_state(
    directory: str, layout: ZeroLayout, scheduler: Any = None, *, optimizer_class: str, engine: Any = None
) -> str:
    """Write ``layout``'s state: this process's elements of every state tensor (and of the fp32 master weights
    under bf16 / fp16) as 1-D ranges of the flattened global tensors, and ``engine``'s step counters; returns the
    manifest's path."""
    checkpoint_id = broadcast_text(os.urandom(16).hex() if rank() == 0 else "")
    folder = f"optimizer-shards-{checkpoint_id}"
    file_name = shard_file_name(rank())
    state_of = [layout.client.state.get(h) or {} for h in layout.holders]

    specs: dict[str, torch.Tensor] = {}
    sources: dict[str, torch.Tensor] = {}
    ranges: dict[str, list[int]] = {}
    records: dict[str, dict[str, Any]] = {}
    masters: dict[str, dict[str, Any]] = {}

    def add(key: str, flat: torch.Tensor, p: Any, record: dict[str, Any]) -> None:
        record.update(sharded=key, shape=list(p.shape), dtype=str(flat.dtype).removeprefix("torch."))
        piece = p.piece
        if piece is None:
            record["chunks"] = []
            return
        view = flat.detach().view(-1)[piece.local : piece.local + piece.length]
        specs[key] = torch.empty(piece.length, dtype=flat.dtype, device="meta")
        sources[key] = view
        ranges[key] = [piece.start, piece.start + piece.length]
        record["chunks"] = [{"file": file_name, "range": ranges[key]}]

    for p in layout.params:
        holder = p.piece.holder if p.piece is not None else layout.holder_group.index(p.group)
        entries = state_of[holder]
        record: dict[str, Any] = {}
        for key, value in entries.items():
            where = f"state[{p.name!r}][{key!r}]"
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.numel() != layout.holders[holder].numel():
                    raise ValueError(f"{where}: ZeRO state must be shaped like the flat partition")
                record[key] = {}
                add(f"state.{p.name}.{key}", value, p, record[key])
            else:
                record[key] = {"value": encode_value(value, f"state.{p.name}.{key}", where)}
        records[p.name] = record
        if layout.low_precision:
            masters[p.name] = {}
            add(f"master.{p.name}", layout.holders[holder], p, masters[p.name])

    error = None
    tmp_dir = os.path.join(directory, f".{folder}.tmp")
    try:
        if rank() == 0:
            os.makedirs(tmp_dir, exist_ok=True)
        barrier()
        metadata = partition_metadata(checkpoint_id, ranges)
        write_safetensors_streaming(
            os.path.join(tmp_dir, file_name), specs, lambda k: sources[k], metadata, fsync=False
        )
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    error = agree(error)
    if error is not None:
        if rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise OSError(f"saving ZeRO optimizer state to {directory!r} failed: {error}")

    # every process's records, merged on rank 0: the chunks of each tensor, from the process that holds it
    mine = json.dumps({"state": records, "master": masters})
    gathered = [json.loads(text) for text in gather_text(mine)]
    manifest_path = os.path.join(directory, SHARDED_MANIFEST_NAME)
    if rank() == 0:
        state, master = gathered[0]["state"], gathered[0]["master"]
        for other in gathered[1:]:
            for section, merged in (("state", state), ("master", master)):
                for name, entries in other[section].items():
                    target = merged[name] if section == "master" else merged.setdefault(name, {})
                    if section == "master":
                        target["chunks"] += entries["chunks"]
                        continue
                    for key, entry in entries.items():
                        if key in target and "chunks" in entry:
                            target[key]["chunks"] += entry["chunks"]
                        else:
                            target.setdefault(key, entry)
        entries = [entry for record in state.values() for entry in record.values()] + list(master.values())
        for entry in entries:
            if "chunks" in entry:
                entry["chunks"].sort(key=lambda c: c["range"])
        groups = []
        for g, (group, names) in enumerate(
            zip(layout.client.param_groups, layout.group_names(), strict=True)
        ):
            hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            groups.append(
                {
                    "params": names,
                    "hyperparameters": encode_value(hyper, f"param_groups.{g}", f"param_groups[{g}]"),
                }
            )
        scheduler_state = None
        if scheduler is not None:
            inner = unwrap_scheduler(scheduler)
            scheduler_state = {
                "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
                "config": getattr(inner, "hf_optim_config", None),
                "state_dict": encode_value(inner.state_dict(), "scheduler", "scheduler.state_dict()"),
            }
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        doc = manifest(
            checkpoint_id,
            optimizer_class=optimizer_class,
            world=world,
            stage=layout.stage,
            dtype=layout.model_dtype,
            param_groups=groups,
            state={p.name: state[p.name] for p in layout.params if state.get(p.name)},
            master_weights={p.name: master[p.name] for p in layout.params} if layout.low_precision else None,
            loss_scaler=_scaler_state(layout.zero),
            engine=engine_counters(engine),
            scheduler=scheduler_state,
        )
        commit_folder(directory, tmp_dir, folder, doc, checkpoint_id)
    barrier()
    logger.debug("saved ZeRO-%d optimizer state to %s", layout.stage, directory)
    return manifest_path


def commit_folder(
    directory: str, tmp_dir: str, folder: str, manifest: dict[str, Any], checkpoint_id: str
) -> None:
    """Rename the partition folder into place, then the manifest (the commit), then remove older folders."""
    os.replace(tmp_dir, os.path.join(directory, folder))
    tmp_manifest = os.path.join(directory, f".{SHARDED_MANIFEST_NAME}.{checkpoint_id}.tmp")
    with open(tmp_manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
    os.replace(tmp_manifest, os.path.join(directory, SHARDED_MANIFEST_NAME))
    doomed = []
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if entry.startswith("optimizer-shards-") and entry != folder:
            hidden = os.path.join(directory, f".{entry}.{os.urandom(8).hex()}.tmp")
            with contextlib.suppress(OSError):
                os.replace(
                    path, hidden
                )  # instant; the deletion (freeing its page cache) runs in the background
                doomed.append(hidden)
        elif entry.startswith(".optimizer-shards-") and entry.endswith(".tmp") and entry != f".{folder}.tmp":
            doomed.append(path)
    if doomed:
        threading.Thread(target=_remove, args=(doomed,), name="hf_optim-cleanup", daemon=True).start()


def _remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
