"""Loading sharded state (checked against the live objects, all ranks agreeing) and inspecting it."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from hf_optim._utils import restored_on_error, unwrap_optimizer, unwrap_scheduler
from hf_optim.errors import CheckpointError
from hf_optim.state.checks import (
    check_hyperparameters,
    check_param_state,
    check_same_structure,
    check_scheduler_state,
    expected_state_keys,
)
from hf_optim.state.format import qualname
from hf_optim.state.sharded._dist import (
    agree,
    broadcast_text,
    distributed,
    machine_union,
    parameter_names,
)
from hf_optim.state.sharded._format import (
    ACCUMULATOR_PREFIX,
    RESERVED,
    SHARDED_MANIFEST_NAME,
    decode_value,
)
from hf_optim.state.sharded._read import (
    CheckedReader,
    Manifest,
    TensorPlan,
    close_manifest,
    needed_files,
    open_shards,
    read_manifest,
    read_manifest_doc,
    sharded_manifest_files,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Checked:
    """What the manifest says, decoded and checked against the live objects (nothing applied yet)."""

    groups: list[dict[str, Any]]  # hyperparameters to apply, group by group
    values: dict[str, dict[str, Any]]  # non-tensor state by parameter name
    scheduler_state: dict[str, Any] | None
    #: the accumulator's counters and, for each gradient, its tensor key (None where it had none)
    accumulator: tuple[dict[str, Any], list[str | None]] | None = None


def _check_against_live(
    manifest: Manifest,
    opt: torch.optim.Optimizer,
    names: Mapping[int, str],
    scheduler: Any,
    accumulator: Any,
    model_params: Mapping[str, torch.Tensor],
) -> _Checked:
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    groups = manifest.doc.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise CheckpointError(
            f"{path}: {len(groups) if isinstance(groups, list) else '?'} param groups saved, "
            f"the optimizer has {len(opt.param_groups)}"
        )
    params: dict[str, torch.Tensor] = {}
    group_of: dict[str, int] = {}
    checked_groups = []
    for g, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        where = f"{path}: param_groups[{g}]"
        if not isinstance(saved, dict) or set(saved) != {"params", "hyperparameters"}:
            raise CheckpointError(f"{where} is malformed")
        if saved["params"] != [names[id(p)] for p in live["params"]]:
            raise CheckpointError(f"{where} holds other parameters than the optimizer's group {g}")
        params.update({names[id(p)]: p for p in live["params"]})
        group_of.update({names[id(p)]: g for p in live["params"]})
        hyper = decode_value(saved["hyperparameters"], where)
        if not isinstance(hyper, dict) or RESERVED & set(hyper):
            raise CheckpointError(f"{where}: hyperparameters must be an object without reserved keys")
        live_hyper = {k: v for k, v in live.items() if k not in ("params", "param_names")}
        missing = sorted(set(live_hyper) - set(hyper))
        if missing:
            raise CheckpointError(f"{where}: hyperparameters {missing} are missing")
        checked_groups.append(check_hyperparameters(opt, g, hyper, live_hyper, where, strict=True, notes=[]))
    # each state tensor belongs to an optimizer parameter; the accumulator's gradients are placed like a model's
    for key, plan in manifest.tensors.items():
        like = (model_params if key.startswith(ACCUMULATOR_PREFIX) else params).get(plan.name)
        if like is None:
            raise CheckpointError(
                f"{path}: {key} belongs to or is placed like {plan.name!r}, which the model lacks"
            )
        if plan.shape != tuple(like.shape):
            raise CheckpointError(
                f"{path}: {key} has global shape {list(plan.shape)}, parameter {plan.name!r} has {list(like.shape)}"
            )
    values: dict[str, dict[str, Any]] = {}
    for name, record in manifest.doc["state"].items():
        if name not in params:
            raise CheckpointError(f"{path}: state for {name!r}, which is not a parameter of the optimizer")
        decoded: dict[str, Any] = {}
        for state_key, entry in record.items():
            where = f"{path}: state[{name!r}][{state_key!r}]"
            if "value" in entry:
                decoded[state_key] = values.setdefault(name, {})[state_key] = decode_value(
                    entry["value"], where
                )
            else:
                plan = manifest.tensors[entry["sharded"]]
                decoded[state_key] = torch.empty(
                    plan.shape, dtype=plan.dtype, device="meta"
                )  # shape, dtype only
        param, live_state = params[name], opt.state.get(params[name])
        expected = None if live_state else expected_state_keys(opt, checked_groups[group_of[name]], param)
        check_param_state(name, decoded, param, live_state, path, expected_keys=expected)
    scheduler_state = None
    if scheduler is not None:
        saved_sched = manifest.doc.get("scheduler")
        if not isinstance(saved_sched, dict) or "state_dict" not in saved_sched:
            raise CheckpointError(f"{path}: no scheduler state saved")
        scheduler_state = decode_value(saved_sched["state_dict"], f"{path}: scheduler")
        live_sched = unwrap_scheduler(scheduler).state_dict()
        check_same_structure(scheduler_state, live_sched, f"{path}: scheduler")
        group_keys = {k for group in opt.param_groups for k in group}
        check_scheduler_state(scheduler_state, live_sched, group_keys, f"{path}: scheduler")
    acc = _check_accumulator(manifest, accumulator, len(model_params)) if accumulator is not None else None
    return _Checked(checked_groups, values, scheduler_state, acc)


def _check_accumulator(
    manifest: Manifest, accumulator: Any, num_params: int
) -> tuple[dict[str, Any], list[str | None]]:
    """The saved accumulator against the live one: class, counters' structure, number and shapes of gradients
    (at most one per model parameter: they are the gradients of some of them)."""
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    saved = manifest.doc.get("accumulator")
    if saved is None:
        raise CheckpointError(f"{path}: no accumulator state saved, but an accumulator was given")
    if saved.get("class") != qualname(accumulator):
        raise CheckpointError(
            f"{path}: the accumulator was saved from {saved.get('class')!r}, not {qualname(accumulator)}"
        )
    rest = decode_value(saved.get("state"), f"{path}: accumulator")
    live = accumulator.state_dict()
    if not isinstance(rest, dict) or "gradients" in rest:
        raise CheckpointError(f"{path}: the accumulator state must be an object without 'gradients'")
    check_same_structure(rest, {k: v for k, v in live.items() if k != "gradients"}, f"{path}: accumulator")
    keys: list[str | None] = []
    live_grads = list(live.get("gradients") or [])
    if len(saved["gradients"]) > num_params:
        raise CheckpointError(
            f"{path}: {len(saved['gradients'])} accumulator gradients saved, more than the model's {num_params} "
            "parameters"
        )
    if live_grads and len(live_grads) != len(saved["gradients"]):
        raise CheckpointError(
            f"{path}: {len(saved['gradients'])} accumulator gradients saved, the accumulator has {len(live_grads)}"
        )
    for i, entry in enumerate(saved["gradients"]):
        if entry is None:
            keys.append(None)
            continue
        plan = manifest.tensors[f"{ACCUMULATOR_PREFIX}{i}"]  # placed like a parameter: checked above
        if live_grads and live_grads[i] is not None and tuple(live_grads[i].shape) != plan.shape:
            raise CheckpointError(
                f"{path}: accumulator gradient {i} has shape {list(plan.shape)}, the accumulator's "
                f"{list(live_grads[i].shape)}"
            )
        keys.append(plan.key)
    return rest, keys


def _read_tensors(manifest: Manifest, targets: Mapping[str, torch.Tensor]) -> None:
    """Fill ``targets`` (``state.<name>.<key>`` -> tensor or DTensor of the global shape) from the shards:
    ``torch.distributed.checkpoint.load`` plans which byte ranges each rank needs, ``CheckedReader`` reads them."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        # one process without a process group: DCP warns that it "assumes" exactly that
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(dict(targets), storage_reader=CheckedReader(manifest), no_dist=not distributed())


def load_sharded_state(
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    model: torch.nn.Module,
) -> tuple[str, list[str]]:
    """Restore state saved by :func:`save_sharded_state` into an FSDP2 or a plain model's optimizer.

    Works on any number of processes (resharding), including one process with a plain model. Every rank
    validates the whole checkpoint against its live objects first, and all ranks raise together if any of them
    finds a problem, leaving every optimizer, scheduler and accumulator unchanged. Each rank opens only the shard
    files holding chunks it needs and reads only those byte ranges. Returns the checkpoint id and the names of
    the parameters whose state was restored.
    """
    directory = os.fspath(directory)
    opt = unwrap_optimizer(optimizer)
    names = parameter_names(model, opt)
    model_params = dict(model.named_parameters())
    manifest: Manifest | None = None
    try:
        # Every failure below is turned into a message the ranks agree on: a rank raising alone would leave the
        # others waiting in a collective.
        error = checked = None
        try:
            manifest = read_manifest(directory, open_all=False)
            checked = _check_against_live(manifest, opt, names, scheduler, accumulator, model_params)
            # the accumulator's gradients are read only into an accumulator
            wanted = {
                k: p
                for k, p in manifest.tensors.items()
                if accumulator is not None or not k.startswith(ACCUMULATOR_PREFIX)
            }
            open_shards(manifest, needed_files(manifest, _layouts(wanted, model_params)))
        except CheckpointError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"{directory}: the checkpoint does not fit ({type(exc).__name__}: {str(exc)[:300]})"
        error = agree(error)
        if error is not None or manifest is None or checked is None:
            raise CheckpointError(error or "another process could not read the checkpoint")
        first = broadcast_text(manifest.checkpoint_id)  # node-local copies: every process must read one save
        error = agree(
            None
            if first == manifest.checkpoint_id
            else f"{directory} holds save {manifest.checkpoint_id}, rank 0 read save {first}"
        )
        if error is not None:
            raise CheckpointError(error)
        params = {names[id(p)]: p for group in opt.param_groups for p in group["params"]}
        targets = {
            key: torch.empty_like(model_params[plan.name].detach(), dtype=plan.dtype)
            for key, plan in wanted.items()
        }
        try:
            _read_tensors(manifest, targets)
            if read_manifest_doc(directory).get("checkpoint_id") != manifest.checkpoint_id:
                raise CheckpointError(f"{directory}: the checkpoint changed while loading")
        except CheckpointError as exc:
            error = str(exc)
        except (Exception, CheckpointException) as exc:  # DCP wraps any rank's failure in a BaseException
            error = (
                f"{manifest.shard_dir}: reading the shards failed ({type(exc).__name__}: {str(exc)[:300]})"
            )
        error = agree(error)
        if error is not None:
            raise CheckpointError(error)
    finally:
        close_manifest(manifest)
    _apply(manifest, checked, opt, params, targets, scheduler, accumulator)
    logger.debug("loaded sharded optimizer state from %s", directory)
    return manifest.checkpoint_id, list(manifest.doc["state"])


def _layouts(
    plans: Mapping[str, TensorPlan], model_params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each sharded tensor's key -> the parameter laid out like it (its shape and placement: what to read)."""
    return {key: model_params[plan.name] for key, plan in plans.items()}


def machine_files(manifest_path: str, model: torch.nn.Module) -> list[str]:
    """The files of a sharded checkpoint the processes on this machine read (relative paths, the manifest
    first), for downloading only those; every file when the manifest does not say where each chunk is, or does
    not fit the model (the load then says why). A collective: call it on every process."""
    directory = os.path.dirname(manifest_path)
    error = listed = None
    try:
        listed = sharded_manifest_files(manifest_path)
    except CheckpointError as exc:
        error = str(exc)
    error = agree(error)
    if error is not None or listed is None:
        raise CheckpointError(error or "another process could not read the manifest")
    folder = os.path.dirname(listed[-1])
    mine: set[str] | None = None
    manifest = None
    try:
        manifest = read_manifest(directory, open_all=False)
        if manifest.mapped:
            mine = needed_files(manifest, _layouts(manifest.tensors, dict(model.named_parameters())))
    except Exception:  # only chooses what to download: the load itself reports the problem, on every rank
        mine = None
    finally:
        close_manifest(manifest)
    names = [os.path.basename(f) for f in listed[1:]]
    wanted = machine_union([mine is None or name in mine for name in names])
    return [listed[0], *(f"{folder}/{name}" for name, want in zip(names, wanted, strict=True) if want)]


def _apply(
    manifest: Manifest,
    checked: _Checked,
    opt: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    scheduler: Any,
    accumulator: Any,
) -> None:
    """Install the loaded state, hyperparameters and scheduler position (validated), or change nothing.

    Through the optimizer's own ``load_state_dict`` (its key checks, torch's placement of ``step``); the state
    tensors keep their saved dtype, as in the single-process format."""
    path = os.path.join(manifest.directory, SHARDED_MANIFEST_NAME)
    live_sd = opt.state_dict()
    index_of = {
        id(p): i
        for group, sd_group in zip(opt.param_groups, live_sd["param_groups"], strict=True)
        for p, i in zip(group["params"], sd_group["params"], strict=True)
    }
    state: dict[int, dict[str, Any]] = {}
    for name, record in manifest.doc["state"].items():
        state[index_of[id(params[name])]] = {
            key: targets[entry["sharded"]] if "sharded" in entry else checked.values[name][key]
            for key, entry in record.items()
        }
    groups = [
        {**sd_group, **hyper} for sd_group, hyper in zip(live_sd["param_groups"], checked.groups, strict=True)
    ]
    with restored_on_error(opt, scheduler, accumulator):
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: the optimizer refused the state: {err}") from None
        for name, record in manifest.doc[
            "state"
        ].items():  # torch casts floating state to the parameter dtype
            for key, entry in record.items():
                if "sharded" in entry:
                    opt.state[params[name]][key] = targets[entry["sharded"]]
        if scheduler is not None:
            try:
                unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(checked.scheduler_state))
            except (ValueError, TypeError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"{path}: the scheduler refused its state: {err}") from None
        if checked.accumulator is not None:
            rest, keys = checked.accumulator
            gradients = [targets[key] if key is not None else None for key in keys]
            try:
                accumulator.load_state_dict({**copy.deepcopy(rest), "gradients": gradients})
            except (ValueError, TypeError, RuntimeError) as err:
                raise CheckpointError(f"{path}: the accumulator refused its state: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedStateInfo:
    """What a sharded checkpoint holds, read without torch.distributed or a model."""

    directory: str
    checkpoint_id: str
    optimizer_class: str | None
    world_size: int | None
    num_shards: int
    parameters: dict[str, dict[str, tuple[int, ...]]]  # name -> state key -> global shape
    has_scheduler: bool
    #: the saved accumulator's gradients: how many (``None`` where it held none), or None without an accumulator
    accumulator_gradients: int | None = None


def inspect_sharded_state(directory: str | os.PathLike[str]) -> ShardedStateInfo:
    """Describe a sharded checkpoint (validated like a load): parameters, global shapes, number of shards."""
    manifest = read_manifest(os.fspath(directory))
    close_manifest(manifest)
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, plan in manifest.tensors.items():
        if key.startswith(ACCUMULATOR_PREFIX):
            continue
        params.setdefault(plan.name, {})[plan.state_key] = plan.shape
    opt = manifest.doc.get("optimizer")
    world = manifest.doc.get("world_size")
    return ShardedStateInfo(
        directory=manifest.directory,
        checkpoint_id=manifest.checkpoint_id,
        optimizer_class=opt.get("class")
        if isinstance(opt, dict) and isinstance(opt.get("class"), str)
        else None,
        world_size=world if isinstance(world, int) and not isinstance(world, bool) else None,
        num_shards=len(manifest.doc["shards"]["files"]),
        parameters=params,
        has_scheduler=isinstance(manifest.doc.get("scheduler"), dict),
        accumulator_gradients=len(manifest.doc["accumulator"]["gradients"])
        if manifest.doc.get("accumulator") is not None
        else None,
    )
