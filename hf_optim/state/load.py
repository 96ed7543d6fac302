"""Loading checkpoints: ``load_state`` (into live objects, all-or-nothing), ``load_state_dict`` (a validated
torch-format dict), ``load_object_state`` and ``has_state``.

Everything is read and checked before any live object changes; if applying fails anyway, the optimizer,
scheduler (its whole ``__dict__``) and accumulator are restored.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim._utils import restored_on_error, unwrap_optimizer, unwrap_scheduler
from hf_optim.errors import CheckpointError
from hf_optim.state import sharded, zero
from hf_optim.state.checks import (
    check_hyperparameters,
    check_param_state,
    check_same_structure,
    check_scheduler_state,
    expected_state_keys,
)
from hf_optim.state.codec import check_tensor_nodes, decode, tensor_refs
from hf_optim.state.format import (
    ACCUMULATOR_NAME,
    KIND_ACCUMULATOR,
    KIND_OBJECT,
    KIND_SCHEDULER,
    METADATA_KEY,
    SCHEDULER_NAME,
    check_metadata,
    qualname,
)
from hf_optim.state.io import checkpoint_roots, open_file, read_json, read_safetensors, read_tensors
from hf_optim.state.match import fail, plan_optimizer, raise_errors
from hf_optim.state.reader import Checkpoint, encoded_values, open_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["LoadReport", "has_state", "load_object_state", "load_state", "load_state_dict", "read_scheduler"]


@dataclass(frozen=True, repr=False)
class LoadReport:
    """What :func:`load_state` restored and what it skipped (with ``strict=False``)."""

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


def read_scheduler(ckpt: Checkpoint) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """``scheduler.json`` of the checkpoint: (path, validated document, decoded state dict), or None."""
    f = ckpt.companion("scheduler")
    if f is None:
        return None
    doc = check_metadata(read_json(f), f.path, KIND_SCHEDULER)
    if doc["checkpoint_id"] != ckpt.checkpoint_id:
        raise CheckpointError(
            f"{f.path} records checkpoint id {doc['checkpoint_id']!r}, not {ckpt.checkpoint_id!r} like {ckpt.manifest}"
        )
    for key in ("class", "name"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise CheckpointError(f"{f.path}: {key!r} must be a string or null")
    state = decode(doc.get("state_dict"), {}, f.path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{f.path}: state_dict is not a dictionary")
    return f.path, doc, state


def _scheduler_state(
    ckpt: Checkpoint, scheduler: Any, strict: bool, notes: list[str], mismatch: dict[str, tuple[Any, Any]]
) -> dict[str, Any] | None:
    errors: list[str] = []
    saved = read_scheduler(ckpt)
    if saved is None:
        fail(errors, strict, notes, f"the checkpoint has no {SCHEDULER_NAME} but a scheduler was given")
        raise_errors(errors, ckpt.path)
        return None
    path, doc, state = saved
    notes_before = len(notes)
    inner = unwrap_scheduler(scheduler)
    saved_class = doc.get("class")
    if saved_class is not None and saved_class != qualname(inner):
        fail(errors, strict, notes, f"{path} was saved from {saved_class}, not {qualname(inner)}")
    config = getattr(inner, "hf_optim_config", None)
    live_name = config.get("name") if isinstance(config, Mapping) else None
    saved_name = doc.get("name")
    if saved_name is not None and live_name is not None and saved_name != live_name:
        fail(
            errors, strict, notes, f"{path} holds schedule {saved_name!r} but the scheduler is {live_name!r}"
        )
    live_state = {k: v for k, v in inner.state_dict().items() if k != "hf_optim_config"}
    state = {k: v for k, v in state.items() if k != "hf_optim_config"}
    base_lrs, live_lrs = state.get("base_lrs"), live_state.get("base_lrs")
    if isinstance(base_lrs, list) and isinstance(live_lrs, list) and len(base_lrs) != len(live_lrs):
        fail(
            errors, strict, notes, f"{path} has {len(base_lrs)} learning rates, the scheduler {len(live_lrs)}"
        )
    if not errors and len(notes) == notes_before:
        # same class and group count: the state must have exactly the live state's keys and types
        check_same_structure(state, live_state, f"{path}: state_dict")
        live_opt = getattr(inner, "optimizer", None)
        group_keys = {k for g in getattr(live_opt, "param_groups", ()) for k in g if isinstance(k, str)}
        check_scheduler_state(state, live_state, group_keys, f"{path}: state_dict")
        last_epoch = state.get("last_epoch")
        if "last_epoch" in live_state and (not isinstance(last_epoch, int) or isinstance(last_epoch, bool)):
            raise CheckpointError(f"{path}: last_epoch must be an int, got {last_epoch!r}")
    raise_errors(errors, ckpt.path)
    if len(notes) > notes_before:
        notes.append("scheduler state not loaded")
        return None
    if saved_name is not None and saved_name == live_name:
        saved_kwargs = decode(doc.get("kwargs"), {}, path)
        live_kwargs = config.get("kwargs") if isinstance(config, Mapping) else None
        if saved_kwargs != live_kwargs:
            notes.append(
                f"schedule {saved_name!r} was saved with arguments {saved_kwargs}, now {live_kwargs}"
            )
            saved_map = saved_kwargs if isinstance(saved_kwargs, dict) else {}
            live_map = live_kwargs if isinstance(live_kwargs, Mapping) else {}
            for key in sorted(set(saved_map) | set(live_map), key=str):
                if saved_map.get(key) != live_map.get(key):
                    mismatch[key] = (saved_map.get(key), live_map.get(key))
    return state


def _accumulator_state(
    ckpt: Checkpoint, accumulator: Any, strict: bool, notes: list[str]
) -> dict[str, Any] | None:
    errors: list[str] = []
    f = ckpt.companion("accumulator")
    if f is None:
        fail(errors, strict, notes, f"the checkpoint has no {ACCUMULATOR_NAME} but an accumulator was given")
        raise_errors(errors, ckpt.path)
        return None
    st = read_safetensors(f)
    meta = check_metadata(st.metadata.get(METADATA_KEY), f.path, KIND_ACCUMULATOR)
    notes_before = len(notes)
    check_tensor_nodes(meta.get("state"), st.entries, f.path)
    saved_class = meta.get("class")
    if saved_class is not None and saved_class != qualname(accumulator):
        fail(errors, strict, notes, f"{f.path} was saved from {saved_class}, not {qualname(accumulator)}")
    refs = {r["tensor"] for r in tensor_refs(meta.get("state"))}
    if set(st.entries) != refs:
        raise CheckpointError(f"{f.path}: the tensors in the file do not match its metadata")
    live_state = accumulator.state_dict() if callable(getattr(accumulator, "state_dict", None)) else None
    saved_state = meta.get("state")
    if (
        isinstance(live_state, Mapping)
        and isinstance(saved_state, dict)
        and isinstance(saved_state.get("dict"), dict)
    ):
        saved_grads = saved_state["dict"].get("gradients")
        live_grads = live_state.get("gradients")
        if isinstance(saved_grads, list) and isinstance(live_grads, list) and live_grads:
            if len(saved_grads) != len(live_grads):
                fail(
                    errors,
                    strict,
                    notes,
                    f"{f.path} has {len(saved_grads)} gradients, the accumulator {len(live_grads)}",
                )
            else:
                for i, (node, g) in enumerate(zip(saved_grads, live_grads, strict=True)):
                    if (
                        isinstance(g, torch.Tensor)
                        and isinstance(node, dict)
                        and "tensor" in node
                        and list(node["shape"]) != list(g.shape)
                    ):
                        fail(
                            errors,
                            strict,
                            notes,
                            f"{f.path}: gradient {i} has shape {tuple(node['shape'])}, the accumulator's "
                            f"{tuple(g.shape)}",
                        )
    raise_errors(errors, ckpt.path)
    if len(notes) > notes_before:
        notes.append("accumulator state not loaded")
        return None
    tensors = read_tensors(st, list(st.entries))
    value = decode(saved_state, tensors, f.path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{f.path}: the accumulator state is not a dictionary")
    gradients = value.get("gradients")
    for i, g in enumerate(gradients if isinstance(gradients, list) else []):
        if isinstance(g, torch.Tensor) and not g.is_floating_point():
            raise CheckpointError(f"{f.path}: gradient {i} has dtype {g.dtype}; gradients are floating point")
    if isinstance(live_state, Mapping):
        check_same_structure(
            {k: v for k, v in value.items() if k != "gradients"},
            {k: v for k, v in live_state.items() if k != "gradients"},
            f"{f.path}: state",
        )
    return value


def load_state(
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    subfolder: str | None = None,
    strict: bool = True,
    roots: Iterable[str] | None = None,
    model: torch.nn.Module | None = None,
) -> LoadReport:
    """Restore state saved by :func:`save_state` from a local directory (``hf_optim.load_state`` adds the Hub).

    Everything is validated (format version, files, parameter names, group structure, shapes, dtypes, the
    hyperparameters' and scheduler state's types and values) before the optimizer, scheduler or accumulator is
    touched; on any error they are left exactly as they were. State tensors are placed on their parameter's
    device with their saved dtype; hyperparameters and the scheduler's position are restored, so training
    continues bit for bit. With ``strict=False`` the matching part is loaded and the :class:`LoadReport` lists
    the rest. ``roots``: folders the checkpoint's files may resolve into through symlinks (default: the
    checkpoint folder itself).

    ``model``: the trained model. With a plain model it names the parameters (when the optimizer was not given
    ``named_parameters()``). It is required for sharded state: a sharded checkpoint (``optimizer.sharded.json``)
    loads on any number of processes, or into a plain single-process model; an FSDP2 optimizer (``DTensor``
    parameters) also loads an ordinary checkpoint, each process reading only its own shard of the state tensors.
    Call it on every process then.
    """
    directory = os.fspath(directory)
    if subfolder:
        parts = subfolder.replace("\\", "/").strip("/").split("/")
        if any(part in ("", ".", "..") for part in parts) or os.path.isabs(subfolder):
            raise ValueError(f"subfolder must be a relative path inside the directory, got {subfolder!r}")
        directory = os.path.join(directory, *parts)
    zero_optimizer = zero.find_zero(optimizer, model)
    if zero_optimizer is not None or (
        model is not None and sharded.has_sharded_state(directory) and zero.is_range_layout(directory)
    ):
        if model is None:
            raise ValueError(
                "the optimizer is DeepSpeed ZeRO's: pass model= (the engine) to name its parameters"
            )
        if accumulator is not None:
            raise ValueError(
                "a GradientAccumulator is not loaded with ZeRO state: DeepSpeed accumulates gradients"
            )

        def open_plan() -> zero.Plan:
            if sharded.has_sharded_state(directory) or not has_state(directory):
                return zero.read_manifest(directory)
            ckpt = open_checkpoint(directory, roots=roots)
            try:
                saved = read_scheduler(ckpt)
                return zero.plan_from_checkpoint(ckpt, saved[2] if saved is not None else None)
            except BaseException:
                ckpt.close()
                raise

        if zero_optimizer is not None:
            layout = zero.zero_layout(zero_optimizer, model)
            checkpoint_id, loaded, notes = zero.load_ranges(open_plan, layout=layout, scheduler=scheduler)
        else:
            opt = unwrap_optimizer(optimizer)
            names = sharded.parameter_names(zero.module_of(model), opt)
            checkpoint_id, loaded, notes = zero.load_ranges(
                open_plan, optimizer=opt, names=names, scheduler=scheduler
            )
        return LoadReport(
            source=directory,
            checkpoint_id=checkpoint_id,
            loaded=tuple(loaded),
            param_groups_restored=True,
            scheduler_loaded=scheduler is not None,
            accumulator_loaded=False,
            notes=tuple(notes),
        )
    opt = unwrap_optimizer(optimizer)
    is_sharded = sharded.is_sharded(opt)
    if is_sharded and model is None:
        raise ValueError(
            "the optimizer's state is sharded (FSDP2 DTensor parameters): pass model= to name it"
        )
    if sharded.has_sharded_state(directory) and (is_sharded or not has_state(directory)):
        if model is None:
            raise ValueError(f"{directory} holds sharded optimizer state: pass model= to name the parameters")
        checkpoint_id, loaded = sharded.load_sharded_state(
            directory, opt, scheduler, accumulator, model=model
        )
        return LoadReport(
            source=directory,
            checkpoint_id=checkpoint_id,
            loaded=tuple(loaded),
            param_groups_restored=True,
            scheduler_loaded=scheduler is not None,
            accumulator_loaded=accumulator is not None,
        )
    with open_checkpoint(directory, roots=roots) as ckpt:
        names = sharded.parameter_names(model, opt) if model is not None else None
        return _load(ckpt, opt, scheduler, accumulator, strict, names)


def _build_state_dict(
    ckpt: Checkpoint, opt: torch.optim.Optimizer, live_sd: Mapping[str, Any], strict: bool, notes: list[str]
) -> tuple[dict[str, Any], dict[int, str], bool, dict[str, list[str]], dict[int, dict[str, Any]]]:
    """Read, decode and check the optimizer part; returns the new state dict in the live numbering."""
    plan, group_map, lists = plan_optimizer(ckpt, opt, live_sd, strict, notes)
    restore_groups = group_map is not None
    if group_map is None:
        notes.append("param-group hyperparameters not restored (the groups do not pair up)")
    meta = ckpt.meta
    nodes = encoded_values(meta, set(plan.values()), groups=restore_groups)
    params = [p for group in opt.param_groups for p in group["params"]]
    index_to_param = dict(zip((i for g in live_sd["param_groups"] for i in g["params"]), params, strict=True))
    tensors = _read_tensors(ckpt, {ref["tensor"] for ref in tensor_refs(nodes)}, plan, index_to_param)
    new_state: dict[Any, Any] = {}
    saved_values: dict[int, dict[str, Any]] = {}
    for index, pstate in live_sd["state"].items():
        if index not in plan:
            new_state[index] = pstate  # not matched (strict=False): keep what the optimizer had
    new_groups = []
    for g, live_group in enumerate(live_sd["param_groups"]):
        group = dict(live_group)
        if group_map is not None:
            saved = decode(
                {"dict": meta["param_groups"][group_map[g]]["hyperparameters"]},
                tensors,
                f"{ckpt.path}: param group {group_map[g]}",
            )
            live_hyper = {k: v for k, v in live_group.items() if k not in ("params", "param_names")}
            checked = check_hyperparameters(
                opt, g, saved, live_hyper, f"{ckpt.path}: param group {g}", strict=strict, notes=notes
            )
            absent = sorted(set(live_hyper) - set(saved))
            if absent:
                notes.append(
                    f"param group {g}: kept the optimizer's values of {absent} (not in the checkpoint)"
                )
            group.update(checked)
        new_groups.append(group)
    index_to_group = {i: g for g, group in enumerate(live_sd["param_groups"]) for i in group["params"]}
    expected: dict[tuple[int, torch.dtype], frozenset[str] | None] = {}
    for index, key in plan.items():
        if key in meta["state"]:
            value = {
                k: decode(v, tensors, f"{ckpt.path}: state of {key!r}") for k, v in meta["state"][key].items()
            }
            param, g = index_to_param[index], index_to_group[index]
            live_pstate = live_sd["state"].get(index)
            if not live_pstate and (g, param.dtype) not in expected:
                expected[g, param.dtype] = expected_state_keys(opt, new_groups[g], param)
            check_param_state(
                key, value, param, live_pstate, ckpt.path, expected_keys=expected.get((g, param.dtype))
            )
            new_state[index] = value
            saved_values[index] = value
    new_sd: dict[str, Any] = {"state": new_state, "param_groups": new_groups}
    for k, node in (meta.get("extra") or {}).items():
        new_sd[k] = decode(node, tensors, f"{ckpt.path}: optimizer.state_dict()[{k!r}]")
    return new_sd, plan, restore_groups, lists, saved_values


def _read_tensors(
    ckpt: Checkpoint, keys: set[str], plan: Mapping[int, str], index_to_param: Mapping[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Read the tensors ``keys``: a state tensor shaped like its ``DTensor`` parameter (FSDP2) only in the part
    this process holds, wrapped as a ``DTensor`` placed like the parameter; everything else whole."""
    local: dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = {}
    for index, key in plan.items():
        param = index_to_param[index]
        region = sharded.local_region(param)
        if region is None:
            continue
        for node in (ckpt.meta["state"].get(key) or {}).values():
            name = node.get("tensor") if isinstance(node, dict) and node.get("python") is None else None
            if name in keys and ckpt.entries[name].shape == tuple(param.shape):
                local[name] = (param, *region)
    tensors = ckpt.read_tensors(keys - local.keys())
    parts = ckpt.read_regions({name: (offsets, sizes) for name, (_, offsets, sizes) in local.items()})
    tensors.update({name: sharded.like_parameter(parts[name], local[name][0]) for name in parts})
    return tensors


def _load(
    ckpt: Checkpoint,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    accumulator: Any,
    strict: bool,
    names: Mapping[int, str] | None = None,
) -> LoadReport:
    notes: list[str] = []
    mismatch: dict[str, tuple[Any, Any]] = {}
    live_sd = opt.state_dict()
    unnamed = [g for g, sd_group in enumerate(live_sd["param_groups"]) if "param_names" not in sd_group]
    if names is not None:  # name the parameters for matching only: the optimizer's groups stay as they are
        for g in unnamed:
            live_sd["param_groups"][g]["param_names"] = [names[id(p)] for p in opt.param_groups[g]["params"]]
    new_sd, plan, restore_groups, lists, saved_values = _build_state_dict(ckpt, opt, live_sd, strict, notes)
    for g in unnamed:
        new_sd["param_groups"][g].pop("param_names", None)
    sched_state = (
        _scheduler_state(ckpt, scheduler, strict, notes, mismatch) if scheduler is not None else None
    )
    acc_state = _accumulator_state(ckpt, accumulator, strict, notes) if accumulator is not None else None
    ckpt.check_unchanged()

    # Apply: optimizer, scheduler, accumulator; roll back on an unexpected failure.
    inner_sched = unwrap_scheduler(scheduler) if sched_state is not None else None
    stage = ckpt.path
    with restored_on_error(opt, scheduler, accumulator if acc_state is not None else None):
        try:
            opt.load_state_dict(new_sd)
            _restore_saved_dtypes(opt, saved_values)
            if sched_state is not None:
                stage = ckpt.companion("scheduler").path
                # hf_optim_config describes the live scheduler's function: keep it (the kwargs were compared)
                inner_sched.load_state_dict(copy.deepcopy(sched_state))
            if acc_state is not None:
                stage = ckpt.companion("accumulator").path
                accumulator.load_state_dict(acc_state)
        except (ValueError, TypeError, KeyError, OverflowError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            # the object's own load_state_dict refused a value the checks above let through
            raise CheckpointError(f"{stage}: refused while loading: {type(err).__name__}: {err}") from err
    for note in notes:
        logger.warning("load_state(%s): %s", ckpt.directory, note)
    return LoadReport(
        source=ckpt.directory,
        checkpoint_id=ckpt.checkpoint_id,
        loaded=tuple(plan.values()),
        missing=tuple(lists["missing"]),
        unexpected=tuple(lists["unexpected"]),
        mismatched=tuple(lists["mismatched"]),
        param_groups_restored=restore_groups,
        scheduler_loaded=sched_state is not None,
        accumulator_loaded=acc_state is not None,
        scheduler_skipped=scheduler is not None and sched_state is None,
        accumulator_skipped=accumulator is not None and acc_state is None,
        notes=tuple(notes),
        scheduler_mismatch=mismatch,
    )


def _restore_saved_dtypes(opt: torch.optim.Optimizer, saved_values: Mapping[int, dict[str, Any]]) -> None:
    """Undo torch's cast of floating state to the parameter dtype: the state keeps the dtype it was saved with."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, values in saved_values.items():
        state = opt.state.get(params[index]) if index < len(params) else None
        if not state:
            continue
        for k, saved in values.items():
            live = state.get(k)
            if (
                k != "step"
                and isinstance(saved, torch.Tensor)
                and isinstance(live, torch.Tensor)
                and live.dtype != saved.dtype
            ):
                state[k] = saved.to(device=live.device)


def load_state_dict(
    directory: str | os.PathLike[str], *, roots: Iterable[str] | None = None
) -> dict[str, Any]:
    """The checkpoint's optimizer state as a torch-format ``state_dict`` (validated; keys are torch's indices).

    ``param_names`` are included when the state is keyed by name. No live optimizer is needed or checked.
    """
    directory = os.fspath(directory)
    with open_checkpoint(directory, roots=roots) as ckpt:
        meta = ckpt.meta
        tensors = ckpt.read_tensors(list(ckpt.entries))
        groups, state = [], {}
        for g, group in enumerate(meta["param_groups"]):
            hyper = decode({"dict": group["hyperparameters"]}, tensors, f"{ckpt.path}: param group {g}")
            out = {**hyper, "params": [rec["index"] for rec in group["params"]]}
            if meta["keyed_by"] == "name":
                out["param_names"] = [rec["name"] for rec in group["params"]]
            groups.append(out)
            for rec in group["params"]:
                key = rec["name"] if meta["keyed_by"] == "name" else str(rec["index"])
                if key in meta["state"]:
                    state[rec["index"]] = {
                        k: decode(v, tensors, f"{ckpt.path}: state of {key!r}")
                        for k, v in meta["state"][key].items()
                    }
        result: dict[str, Any] = {"state": state, "param_groups": groups}
        for k, node in (meta.get("extra") or {}).items():
            result[k] = decode(node, tensors, f"{ckpt.path}: extra {k!r}")
        return result


def load_object_state(path: str | os.PathLike[str], *, kind: str) -> Any:
    """Read a value saved by :func:`save_object_state`; the file must record the same ``kind``."""
    path = os.fspath(path)
    f = open_file(path, roots=checkpoint_roots(os.path.dirname(os.path.abspath(path))))
    try:
        st = read_safetensors(f)
        meta = check_metadata(st.metadata.get(METADATA_KEY), path, KIND_OBJECT)
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path} holds {meta.get('kind')!r} state, not {kind!r}")
        check_tensor_nodes(meta.get("value"), st.entries, path)
        refs = {r["tensor"] for r in tensor_refs(meta.get("value"))}
        if set(st.entries) != refs:
            raise CheckpointError(f"{path}: the tensors in the file do not match its metadata")
        return decode(meta.get("value"), read_tensors(st, list(st.entries)), path)
    finally:
        f.close()


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete, consistent hf_optim optimizer checkpoint (headers checked only)."""
    try:
        with open_checkpoint(os.fspath(directory)):
            return True
    except (OSError, ValueError):
        return False
