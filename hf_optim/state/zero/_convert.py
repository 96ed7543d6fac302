"""Converting a stock DeepSpeed ZeRO checkpoint (``global_stepN/``, pickled; see :mod:`._stock`) into format
version 3.

The model states file gives ``param_shapes`` (per param group, name -> shape, in the flat buffers' order),
``global_steps`` and the module; each rank's optimizer states file the client optimizer's state for that rank's
flat partitions, and the fp32 partitions themselves. A scheduler DeepSpeed steps is in the model states file; one
it does not (the Trainer's) is read from ``scheduler.pt`` beside the tag's folder, where the Trainer saves it.

Each rank's file is read in turn (memory-mapped) and written as that rank's partition file: the element ranges of
every parameter's state it holds, cut out of its flat partition as ``zero_to_fp32`` reassembles them (stage 1/2:
the group's parameters laid end to end, each rank owning an equal slice; stage 3: each parameter split into
``ceil(numel / world)`` elements per rank). The result loads into ZeRO on any number of processes and any stage,
into FSDP2 or into one plain process. The fp32 weights go to ``model.safetensors`` in the same pass (each rank's
elements written at their place in the file) unless the output folder already has one. Only one rank's file is
mapped at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.io import allocate_safetensors, write_safetensors_streaming, write_tensor_at
from hf_optim.state.pickled import (
    check_stored_sizes,
    check_torch_state_dict,
    infer_optimizer_class,
)
from hf_optim.state.zero._format import (
    SHARDED_MANIFEST_NAME,
    encode_value,
    manifest,
    partition_metadata,
    shard_file_name,
)
from hf_optim.state.zero._layout import ENGINE_COUNTERS
from hf_optim.state.zero._save import commit_folder
from hf_optim.state.zero._stock import (
    DynamicLossScaler,
    FragmentAddress,
    LossScaler,
    find_deepspeed_checkpoint,
    load_file,
    zero_files,
)

logger = logging.getLogger(__name__)

__all__ = ["convert_deepspeed_checkpoint"]

_WEIGHTS_NAME = "model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    flat: (
        int  # its flat buffer: its entry of param_shapes (stage 1/2: its param group; stage 3: its sub-group)
    )
    numel: int = 0
    group: int = 0  # its param group
    state: dict[str, Any] = field(default_factory=dict)
    master: dict[str, Any] | None = None


def _param_shapes(doc: Any, path: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    shapes = doc.get("param_shapes") if isinstance(doc, dict) else None
    if not isinstance(shapes, list) or not shapes:
        raise CheckpointError(f"{path}: no 'param_shapes' (a DeepSpeed ZeRO model states file has them)")
    groups, seen = [], set()
    for g, group in enumerate(shapes):
        if not isinstance(group, dict):
            raise CheckpointError(f"{path}: param_shapes[{g}] is not a mapping")
        out = []
        for name, shape in group.items():
            dims = list(shape) if isinstance(shape, list | tuple) else None
            if (
                not isinstance(name, str)
                or name in seen
                or dims is None
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in dims)
            ):
                raise CheckpointError(f"{path}: param_shapes[{g}] has a bad entry {str(name)[:80]!r}")
            seen.add(name)
            out.append((name, tuple(dims)))
        groups.append(out)
    return groups


def _optim_parts(
    doc: Any, path: str, world: int, stage_of_rank0: int | None
) -> tuple[int, dict[str, Any], list[torch.Tensor], Any]:
    """(stage, the client optimizer's state dict, the fp32 flat partitions, the loss scaler) of a rank's file."""
    osd = doc.get("optimizer_state_dict") if isinstance(doc, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path}: no 'optimizer_state_dict'")
    stage = osd.get("zero_stage")
    if not isinstance(stage, int) or stage not in (1, 2, 3):
        raise CheckpointError(f"{path}: 'zero_stage' is {stage!r}, not 1, 2 or 3")
    if stage_of_rank0 is not None and stage != stage_of_rank0:
        raise CheckpointError(f"{path}: ZeRO stage {stage}, but rank 0's file is stage {stage_of_rank0}")
    counts = osd.get("partition_count")
    counts = counts if isinstance(counts, list) else [counts]
    if not counts or any(c != world for c in counts):
        raise CheckpointError(
            f"{path}: written for {counts} processes, but the folder holds {world} optimizer states files"
        )
    base_key, flat_key = (
        ("optimizer_state_dict", "fp32_flat_groups")
        if stage == 3
        else ("base_optimizer_state", "single_partition_of_fp32_groups")
    )
    base, flats = osd.get(base_key), osd.get(flat_key)
    check_torch_state_dict(base, f"{path} ({base_key})")
    assert isinstance(base, dict)  # for the type checker: checked just above
    if not isinstance(flats, list) or not all(
        isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.float32 for t in flats
    ):
        raise CheckpointError(f"{path}: {flat_key!r} is not a list of flat fp32 tensors")
    check_stored_sizes({"base": base, "flats": flats}, path)
    return stage, base, flats, osd.get("loss_scaler")


class _Converter:
    """One conversion: reads rank files in turn, writes their partitions, then the manifest."""

    def __init__(self, folder: str, output: str, given: str) -> None:
        self.folder, self.output = folder, output
        self.model_path, self.optim_paths = zero_files(folder)
        self.world = len(self.optim_paths)
        model_doc = load_file(self.model_path, folder, "model states file")
        self.groups = _param_shapes(model_doc, self.model_path)
        self.counters = {
            key: value
            for key in ENGINE_COUNTERS
            if isinstance(value := model_doc.get(key), int) and not isinstance(value, bool) and value >= 0
        }
        module = model_doc.get("module")
        dtypes = (
            {t.dtype for t in module.values() if isinstance(t, torch.Tensor)}
            if isinstance(module, dict)
            else set()
        )
        floating = {d for d in dtypes if d.is_floating_point}
        self.model_dtype = floating.pop() if len(floating) == 1 else torch.float32
        sched = model_doc.get("lr_scheduler")
        self.scheduler_state = sched if isinstance(sched, dict) and sched else None
        self.scheduler_path = self.model_path
        if self.scheduler_state is None and given != folder:
            # a scheduler DeepSpeed did not step: the Trainer saves it in the folder given, beside the tag's
            self.scheduler_path = os.path.join(given, "scheduler.pt")
            if os.path.lexists(self.scheduler_path):
                self.scheduler_state = load_file(self.scheduler_path, given, "scheduler state")
        if self.scheduler_state is not None:
            if not isinstance(self.scheduler_state, dict) or not all(
                isinstance(k, str) for k in self.scheduler_state
            ):
                raise CheckpointError(f"{self.scheduler_path}: not a scheduler state_dict")
            check_stored_sizes(self.scheduler_state, self.scheduler_path)
        frozen = model_doc.get("frozen_param_shapes") or {}
        if not isinstance(frozen, dict):
            raise CheckpointError(f"{self.model_path}: 'frozen_param_shapes' is not a mapping")
        self.frozen = len(frozen)
        del model_doc, module
        self.params = [
            _Param(n, s, f, math.prod(s), group=f) for f, flat in enumerate(self.groups) for n, s in flat
        ]
        stored = sum(os.stat(p).st_size for p in self.optim_paths)
        claimed = 4 * sum(p.numel for p in self.params)
        if claimed > stored:  # each element's fp32 master value is in one of the rank files
            raise CheckpointError(
                f"{self.model_path}: param_shapes claim {claimed:,} bytes of fp32 weights, more than the "
                f"{stored:,} bytes of the {self.world} optimizer states files"
            )
        self.stage = 0
        self.checkpoint_id = os.urandom(16).hex()
        self.folder_name = f"optimizer-shards-{self.checkpoint_id}"
        self.tmp_dir = os.path.join(output, f".{self.folder_name}.tmp")
        self.hyper: list[dict[str, Any]] = []
        self.optimizer_class: str | None = None
        self.given_class: str | None = None
        self.class_reason = ""
        self.scaler: dict[str, Any] | None = None
        self.weights_tmp: str | None = None
        self.weights_fd = -1  # the fp32 weights file, filled rank by rank; its tensors' data offsets:
        self.weights_at: dict[str, int] = {}
        self.weights_covered = dict.fromkeys((p.name for p in self.params), 0)
        self.partition_sizes: list[int] | None = None  # stage 1/2: rank 0's, which every rank must share

    def pieces(self, rank: int, stage: int, sizes: list[int]) -> list[tuple[_Param, int, int, int, int]]:
        """(parameter, holder index, local offset, start in the parameter, length) for what ``rank`` holds.

        ``sizes`` are the rank's holder sizes (stage 1/2: one per group, its padded partition; stage 3: one per
        sub-group)."""
        out = []
        if len(sizes) != len(self.groups):
            raise CheckpointError(
                f"{self.optim_paths[rank]}: {len(sizes)} flat partitions, but param_shapes has {len(self.groups)}"
            )
        if stage == 3:  # each parameter's part of every rank, padded, end to end in its sub-group's partition
            local = [0] * len(sizes)
            for p in self.params:
                part = -(-p.numel // self.world)
                start, stop = rank * part, min((rank + 1) * part, p.numel)
                if stop > start:
                    out.append((p, p.flat, local[p.flat], start, stop - start))
                local[p.flat] += part
            if local != sizes:
                raise CheckpointError(
                    f"{self.optim_paths[rank]}: its fp32 partitions of {sizes} elements do not hold the parameters "
                    f"of param_shapes ({local})"
                )
            return out
        offset_in = [0] * len(self.groups)
        for p in self.params:
            size = sizes[p.flat]
            offset = offset_in[p.flat]
            offset_in[p.flat] += p.numel
            low, high = rank * size, (rank + 1) * size
            first, last = max(offset, low), min(offset + p.numel, high)
            if last > first:
                out.append((p, p.flat, first - low, first - offset, last - first))
        for g, total in enumerate(offset_in):
            if total > sizes[g] * self.world:
                raise CheckpointError(
                    f"{self.optim_paths[rank]}: param group {g}'s parameters ({total:,} elements) do not fit "
                    f"its {self.world} partitions of {sizes[g]:,}"
                )
        return out

    def convert_rank(self, rank: int) -> None:
        path = self.optim_paths[rank]
        doc = load_file(path, self.folder, "optimizer states file")
        stage, base, flats, scaler = _optim_parts(doc, path, self.world, self.stage if rank else None)
        if rank == 0:
            self.stage = stage
            self.optimizer_class, self.class_reason = infer_optimizer_class(base)
            if self.given_class is not None:
                self.optimizer_class, self.class_reason = self.given_class, "given"
            # stage 1/2: a flat buffer per param group; stage 3: per sub-group, a group's sub-groups in a row
            flats_of = [len(g["params"]) if stage == 3 else 1 for g in base["param_groups"]]
            if sum(flats_of) != len(self.groups):
                raise CheckpointError(
                    f"{path}: param groups of {sum(flats_of)} flat buffers, but param_shapes has {len(self.groups)}"
                )
            group_of = [g for g, n in enumerate(flats_of) for _ in range(n)]
            for p in self.params:
                p.group = group_of[p.flat]
            self.hyper = [
                {k: v for k, v in g.items() if k not in ("params", "param_names")}
                for g in base["param_groups"]
            ]
            if scaler is not None:
                if not isinstance(scaler, LossScaler | DynamicLossScaler):
                    raise CheckpointError(f"{path}: 'loss_scaler' is not a DeepSpeed loss scaler")
                values = {
                    k: v
                    for k, v in vars(scaler).items()
                    if not k.startswith("_") and isinstance(v, bool | int | float)
                }
                self.scaler = {
                    "class": type(scaler).__name__,
                    "state": encode_value(values, "loss_scaler", "loss_scaler"),
                }
        # the holders: per group (stage 1/2) or per sub-group (stage 3), in the client optimizer's order
        holders = [i for g in base["param_groups"] for i in g["params"]]
        if stage != 3 and any(len(g["params"]) != 1 for g in base["param_groups"]):
            raise CheckpointError(f"{path}: a ZeRO-1/2 param group must hold one flat partition")
        if len(holders) != len(flats):
            raise CheckpointError(f"{path}: {len(holders)} flat parameters but {len(flats)} fp32 partitions")
        states = [base["state"].get(i) or {} for i in holders]
        sizes = []
        for h, (state, flat) in enumerate(zip(states, flats, strict=True)):
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            lengths = {v.numel() for v in tensors.values()}
            if len(lengths) > 1 or any(
                v.dim() != 1 or v.dtype not in _FLOAT_DTYPES for v in tensors.values()
            ):
                raise CheckpointError(
                    f"{path}: the state of flat partition {h} is not flat tensors of one size"
                )
            # stage 1/2 files drop the last rank's padding from the fp32 partition, not from the state
            if lengths:
                size = lengths.pop()
            elif stage != 3 and rank > 0 and h < len(self.partition_sizes or []):
                size = (self.partition_sizes or [])[h]  # no state to tell the padded size: rank 0's
            else:
                size = flat.numel()
            if flat.numel() > size:
                raise CheckpointError(f"{path}: fp32 partition {h} is larger than its optimizer state")
            sizes.append(size)
        if stage != 3 and rank == 0:
            self.partition_sizes = sizes
        elif stage != 3 and sizes != self.partition_sizes:
            raise CheckpointError(f"{path}: its partitions are not the size of rank 0's")
        pieces = self.pieces(rank, stage, sizes)
        for p, holder, local, _, length in pieces:
            if local + length > flats[holder].numel():
                raise CheckpointError(f"{path}: {p.name!r} lies outside its fp32 flat partition")
        paddings = doc["optimizer_state_dict"].get("param_alignment_paddings")
        if isinstance(paddings, list) and any(any(group) for group in paddings if isinstance(group, list)):
            raise CheckpointError(
                f"{path}: parameters aligned with padding between them (DeepSpeed's parameter_alignment): "
                "not supported"
            )
        mappings = doc["optimizer_state_dict"].get("param_slice_mappings")
        if stage != 3 and isinstance(mappings, list):
            self.check_mappings(path, mappings, pieces)

        file_name = shard_file_name(rank)
        specs: dict[str, torch.Tensor] = {}
        sources: dict[str, torch.Tensor] = {}
        ranges: dict[str, list[int]] = {}
        low_precision = self.model_dtype != torch.float32

        def add(
            key: str, flat: torch.Tensor, p: _Param, local: int, start: int, length: int
        ) -> dict[str, Any]:
            if local + length > flat.numel():
                raise CheckpointError(f"{path}: {p.name!r} lies outside its flat optimizer state")
            if key in specs:
                raise CheckpointError(f"{path}: two state tensors would both be named {key!r}")
            specs[key] = torch.empty(length, dtype=flat.dtype, device="meta")
            sources[key] = flat[local : local + length]
            ranges[key] = [start, start + length]
            entry = {"sharded": key, "shape": list(p.shape), "dtype": str(flat.dtype).removeprefix("torch.")}
            return {**entry, "chunks": [{"file": file_name, "range": ranges[key]}]}

        for p, holder, local, start, length in pieces:
            for key, value in states[holder].items():
                if not isinstance(key, str):
                    raise CheckpointError(f"{path}: a state key {key!r} that is not a string")
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    entry = add(f"state.{p.name}.{key}", value, p, local, start, length)
                    if key in p.state:
                        p.state[key]["chunks"] += entry["chunks"]
                    else:
                        p.state[key] = entry
                elif key not in p.state:
                    where = f"{path}: state[{p.name!r}][{key!r}]"
                    if not (
                        value is None
                        or isinstance(value, bool | int | float)
                        or (isinstance(value, torch.Tensor) and value.dim() == 0)
                    ):
                        raise CheckpointError(f"{where}: a non-tensor state value must be a number")
                    try:
                        p.state[key] = {"value": encode_value(value, f"state.{p.name}.{key}", where)}
                    except ValueError as err:
                        raise CheckpointError(str(err)) from None
            if low_precision:
                entry = add(f"master.{p.name}", flats[holder], p, local, start, length)
                if p.master is None:
                    p.master = entry
                else:
                    p.master["chunks"] += entry["chunks"]
        metadata = partition_metadata(self.checkpoint_id, ranges)
        write_safetensors_streaming(
            os.path.join(self.tmp_dir, file_name), specs, lambda k: sources[k], metadata, fsync=True
        )
        if rank == 0 and self.weights_tmp is not None:  # once rank 0's partitions hold what the shapes say
            specs = {p.name: torch.empty(p.shape, device="meta") for p in self.params}
            self.weights_at = allocate_safetensors(self.weights_tmp, specs, {"format": "pt"})
            self.weights_fd = os.open(self.weights_tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        if self.weights_fd >= 0:  # this rank's elements of the fp32 weights, at their place in the file
            for p, holder, local, start, length in pieces:
                position = self.weights_at[p.name] + start * 4
                write_tensor_at(self.weights_fd, position, flats[holder][local : local + length])
                self.weights_covered[p.name] += length

    def check_mappings(
        self, path: str, mappings: list[Any], pieces: list[tuple[_Param, int, int, int, int]]
    ) -> None:
        """DeepSpeed's own record of where each parameter lies in this rank's partition must agree."""
        recorded: dict[str, tuple[Any, Any]] = {}
        for group in mappings:
            if isinstance(group, dict):
                for name, address in group.items():
                    if isinstance(address, FragmentAddress):
                        recorded[name] = (getattr(address, "start", None), getattr(address, "numel", None))
        for p, _, local, _, length in pieces:
            if p.name in recorded and recorded[p.name] != (local, length):
                raise CheckpointError(
                    f"{path}: {p.name!r} lies at {recorded[p.name]} in DeepSpeed's param_slice_mappings, not "
                    f"at {(local, length)} where param_shapes put it (round_robin_gradients reorders the flat "
                    "buffer; such checkpoints are not supported)"
                )

    def run(self) -> list[str]:
        created = not os.path.exists(self.output)
        os.makedirs(self.output, exist_ok=True)
        os.makedirs(self.tmp_dir)
        weights = os.path.join(self.output, _WEIGHTS_NAME)
        weights_tmp = None if os.path.exists(weights) else f"{weights}.{self.checkpoint_id}.tmp"
        try:
            self.weights_tmp = weights_tmp
            for rank in range(self.world):
                self.convert_rank(rank)
                logger.debug("converted %s", self.optim_paths[rank])
            for p in self.params:
                entries = [e for e in p.state.values() if "chunks" in e] + ([p.master] if p.master else [])
                covered = [sum(c["range"][1] - c["range"][0] for c in e["chunks"]) for e in entries]
                if weights_tmp is not None:
                    covered.append(self.weights_covered[p.name])
                if any(n != p.numel for n in covered):
                    raise CheckpointError(
                        f"{self.folder}: the partitions hold {min(covered):,} of {p.name!r}'s {p.numel:,} elements"
                    )
            manifest = self.manifest()
            try:
                json.dumps(manifest, allow_nan=False)
            except ValueError:
                raise CheckpointError(
                    f"{self.folder}: a value JSON cannot hold (NaN or infinity) in the state, groups or scheduler"
                ) from None
            if self.weights_fd >= 0:
                os.fsync(self.weights_fd)
        except BaseException:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            if weights_tmp is not None and os.path.exists(weights_tmp):
                os.remove(weights_tmp)
            if created:
                shutil.rmtree(self.output, ignore_errors=True)
            raise
        finally:
            if self.weights_fd >= 0:
                os.close(self.weights_fd)
                self.weights_fd = -1
        commit_folder(self.output, self.tmp_dir, self.folder_name, manifest, self.checkpoint_id)
        written = [os.path.join(self.output, SHARDED_MANIFEST_NAME)]
        if weights_tmp is None:
            logger.info("%s exists: left as it is (the fp32 weights are not written)", weights)
        else:
            os.replace(weights_tmp, weights)
            written.append(weights)
        return written

    def manifest(self) -> dict[str, Any]:
        groups = []
        for g, hyper in enumerate(self.hyper):
            names = [p.name for p in self.params if p.group == g]
            try:
                encoded = encode_value(hyper, f"param_groups.{g}", f"param_groups[{g}]")
            except ValueError as err:
                raise CheckpointError(f"{self.optim_paths[0]}: {err}") from None
            groups.append({"params": names, "hyperparameters": encoded})
        scheduler = None
        if self.scheduler_state is not None:
            try:
                state = encode_value(self.scheduler_state, "scheduler", "the scheduler state")
            except ValueError as err:
                raise CheckpointError(f"{self.scheduler_path}: {err}") from None
            scheduler = {"class": None, "config": None, "state_dict": state}
        source = f"DeepSpeed ZeRO-{self.stage} checkpoint {os.path.basename(self.folder)} of {self.world} processes"
        info = {
            "source": source,
            "optimizer_class": self.class_reason
            if self.class_reason == "given"
            else f"inferred: {self.class_reason}"
            if self.optimizer_class
            else f"unknown: {self.class_reason}",
            "scheduler": f"from {os.path.basename(self.scheduler_path)}; class unknown"
            if scheduler
            else "none: DeepSpeed saved none, and no scheduler.pt beside it",
        }
        if "global_steps" in self.counters:
            info["global_steps"] = str(self.counters["global_steps"])
        if self.frozen:
            info["frozen_parameters"] = f"{self.frozen} frozen parameters: no optimizer state, not converted"
        return manifest(
            self.checkpoint_id,
            optimizer_class=self.optimizer_class,
            world=self.world,
            stage=self.stage,
            dtype=self.model_dtype,
            param_groups=groups,
            state={p.name: p.state for p in self.params if p.state},
            master_weights={p.name: p.master for p in self.params if p.master}
            if self.model_dtype != torch.float32
            else None,
            loss_scaler=self.scaler,
            engine=self.counters or None,
            scheduler=scheduler,
            info=info,
        )


def convert_deepspeed_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    optimizer_class: str | None = None,
) -> list[str]:
    """Convert a stock DeepSpeed ZeRO 1/2/3 checkpoint into hf_optim's range-partitioned format (version 3).

    Args:
        checkpoint_dir: The folder ``engine.save_checkpoint`` wrote into (or a Trainer ``checkpoint-N``), or its
            ``global_stepN`` folder itself.
        output: Where to write ``optimizer.sharded.json``, its partition folder and ``model.safetensors``
            (default: ``checkpoint_dir``).
        tag: The checkpoint to convert when the folder holds several (default: the one ``latest`` names).
        optimizer_class: The client optimizer's class to record, e.g. ``"hf_optim.optimizers.adamw.AdamW"``
            (default: inferred from its state and group keys).

    Returns:
        The files written: the manifest, and ``model.safetensors`` (the fp32 weights, from the fp32 partitions)
        unless the output folder already had one.

    Raises:
        CheckpointError: naming the file, for a pickle naming a type DeepSpeed does not write, a tensor that would
            grow when rewritten (stride 0, shared storage), partitions from different saves, stages or world sizes,
            or a layout the parameter shapes do not describe. Nothing is written then.
        FileNotFoundError: ``checkpoint_dir`` holds no DeepSpeed checkpoint.

    Example:
        ```python
        from hf_optim.state.zero import convert_deepspeed_checkpoint

        convert_deepspeed_checkpoint("out/checkpoint-500")  # reads out/checkpoint-500/global_step500/
        # then, on any number of processes, under any ZeRO stage, FSDP2 or none:
        model.load_state_dict(load_file("out/checkpoint-500/model.safetensors"))
        hf_optim.load_state("out/checkpoint-500", optimizer, scheduler, model=engine)
        ```
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    folder = find_deepspeed_checkpoint(checkpoint_dir, tag)
    if folder is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {checkpoint_dir}")
    out = os.fspath(output) if output is not None else checkpoint_dir
    converter = _Converter(folder, out, checkpoint_dir)
    converter.given_class = optimizer_class
    written = converter.run()
    logger.info("converted the DeepSpeed checkpoint %s -> %s", folder, out)
    return written
