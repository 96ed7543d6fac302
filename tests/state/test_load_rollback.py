"""Rollback of sharded loads: a load that fails while applying (the optimizer, the scheduler or the
accumulator refusing what it is given, after taking part of it) leaves every live object exactly as it was.

Reference: a twin of the live objects built and trained identically, which no load touches. After the failed
load both must hold the same values, keep the same objects, and go on identically (lr, state, accumulator).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state import load_state
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME, save_sharded_state
from tests.multiprocess import report_and_wait, run_with_deadline
from tests.state.sharded_jobs import make_run, train_accumulating, upload_run, weights_from

_REFUSE: set[int] = (
    set()
)  # objects whose next load_state_dict takes the state, then raises (kept outside them)


class RefusingAccumulator(hf_optim.GradientAccumulator):
    """Takes the state it is given, then refuses it (as a subclass checking something more would), once."""

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if id(self) in _REFUSE:
            _REFUSE.discard(id(self))
            raise ValueError("refused after loading")


class RefusingLambdaLR(LambdaLR):
    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if id(self) in _REFUSE:
            _REFUSE.discard(id(self))
            raise RuntimeError("refused after loading")


def _objects(micro_steps: range, *, counts_items: bool = False):
    model, opt, _ = make_run(1, None)
    sched = RefusingLambdaLR(opt, lambda step: 1.0 / (1 + step))
    acc = RefusingAccumulator()
    if counts_items:
        for micro in micro_steps:
            model(torch.randn(4, 5, generator=torch.Generator().manual_seed(micro))).pow(2).mean().backward()
            acc.accumulate_from(model, num_items=4)
            if micro % 2 == 1:
                acc.apply_to(model)
                opt.step()
                sched.step()
                opt.zero_grad()
    else:
        train_accumulating(model, opt, sched, acc, micro_steps, 0, 1)
    return model, opt, sched, acc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Two optimizer steps and half a window (differs from the live objects: one step and half a window)."""
    model, opt, sched, acc = _objects(range(5))
    path = tmp_path_factory.mktemp("further_saved") / "ckpt"
    save_sharded_state(path, opt, sched, acc, model=model)
    return path


def _fail_optimizer(opt, sched, acc):
    def hook(optimizer):
        handle.remove()  # once
        raise RuntimeError("refused after loading")

    handle = opt.register_load_state_dict_post_hook(hook)  # runs once torch has installed the new state


def _fail_scheduler(opt, sched, acc):
    _REFUSE.add(id(sched))


def _fail_accumulator(opt, sched, acc):
    _REFUSE.add(id(acc))


STAGES = {"optimizer": _fail_optimizer, "scheduler": _fail_scheduler, "accumulator": _fail_accumulator}


def _assert_same_values(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_values(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_values(x, y, f"{where}[{i}]")
    elif not callable(a):
        assert type(a) is type(b) and a == b, (where, a, b)


def _state_by_name(model, opt):
    return {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failed_apply_leaves_the_objects_as_their_untouched_twin(ckpt, stage):
    model, opt, sched, acc = _objects(range(3))
    twin = _objects(range(3))
    state_dicts = dict(_state_by_name(model, opt))
    tensors = {n: dict(d) for n, d in state_dicts.items()}
    state_obj, groups = opt.state, list(opt.param_groups)
    buffers = list(acc.gradients)
    STAGES[stage](opt, sched, acc)
    with pytest.raises((CheckpointError, RuntimeError)):
        load_state(ckpt, opt, sched, acc, model=model)
    # the same objects
    assert opt.state is state_obj
    assert all(a is b for a, b in zip(opt.param_groups, groups, strict=True))
    assert sched.optimizer is opt
    for n, d in state_dicts.items():
        assert all(d[k] is v for k, v in tensors[n].items()), n
    assert all(a is b for a, b in zip(acc.gradients, buffers, strict=True))
    # the same values as the twin's
    _assert_same_values(_state_by_name(model, opt), _state_by_name(twin[0], twin[1]), "state")
    for live, other in zip(opt.param_groups, twin[1].param_groups, strict=True):
        _assert_same_values(
            {k: v for k, v in live.items() if k != "params"},
            {k: v for k, v in other.items() if k != "params"},
            "group",
        )
    _assert_same_values(sched.state_dict(), twin[2].state_dict(), "scheduler")
    _assert_same_values(acc.state_dict(), twin[3].state_dict(), "accumulator")
    # and they go on identically: the scheduler drives this optimizer, the accumulator finishes its window
    for objs in ((model, opt, sched, acc), twin):
        train_accumulating(*objs, range(3, 7), 0, 1)
    _assert_same_values(_state_by_name(model, opt), _state_by_name(twin[0], twin[1]), "state after")
    assert opt.param_groups[0]["lr"] == twin[1].param_groups[0]["lr"]
    _assert_same_values(dict(model.named_parameters()), dict(twin[0].named_parameters()), "parameters after")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failed_apply_keeps_the_optimizer_per_parameter_state_dicts(ckpt, stage):
    """``opt.state[p]`` is the very dict it was (code may hold it, as torch's own functional optimizers do
    between calls): the rollback must put back the original per-parameter dicts, not copies of them."""
    model, opt, sched, acc = _objects(range(3))
    state_dicts = dict(_state_by_name(model, opt))
    STAGES[stage](opt, sched, acc)
    with pytest.raises((CheckpointError, RuntimeError)):
        load_state(ckpt, opt, sched, acc, model=model)
    for n, d in state_dicts.items():
        assert _state_by_name(model, opt)[n] is d, n


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failed_apply_keeps_the_accumulators_num_items_rule(ckpt, stage):
    """Mid-window without ``num_items``, the accumulator refuses a micro-step that gives it (all or none must).
    After a failed load it must still refuse it, exactly as its untouched twin does."""
    model, opt, sched, acc = _objects(range(3))
    twin = _objects(range(3))
    grads = [torch.ones_like(p) for p in twin[0].parameters()]
    with pytest.raises(ValueError, match="num_items must be given"):
        twin[3](grads, num_items=4)
    STAGES[stage](opt, sched, acc)
    with pytest.raises((CheckpointError, RuntimeError)):
        load_state(ckpt, opt, sched, acc, model=model)
    with pytest.raises(ValueError, match="num_items must be given"):
        acc(grads, num_items=4)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_refusal_while_applying_is_a_checkpoint_error(ckpt, stage):
    """Whichever object refuses what it is given, the caller catches one type, as for the optimizer and the
    accumulator (a scheduler's refusal is not let through as a bare RuntimeError)."""
    model, opt, sched, acc = _objects(range(3))
    STAGES[stage](opt, sched, acc)
    with pytest.raises(CheckpointError, match="refused after loading"):
        load_state(ckpt, opt, sched, acc, model=model)


# ---------------------------------------------------------------------------------------------------------------
# Machines that find different manifests at the same commit (one of them offline, its cache holding the other)
# ---------------------------------------------------------------------------------------------------------------

TIMEOUT = 60  # seconds a multi-process test may take before it counts as a hang (2 busy cores)


@pytest.fixture
def saved(sharded_saves):
    """The session's two-process sharded saves (tests/conftest.py)."""
    return sharded_saves


def _offline_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    """One process per machine (``LOCAL_RANK=0``, own cache); machine 1 is offline (``HF_HUB_OFFLINE``, read by
    huggingface_hub at each call), its cache holding the folder's ordinary (consolidated) checkpoint only."""
    import huggingface_hub.constants
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0", GROUP_RANK=str(rank))
    if rank == 1:
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=8))
    result: dict = {}
    try:
        model, opt, sched = make_run(world, weights_from(os.path.join(out, "at_save.safetensors")))
        try:
            hf_optim.load_state(url, opt, sched, model=model, cache_dir=os.path.join(out, f"machine{rank}"))
            result["outcome"] = "loaded"
        except Exception as exc:
            result["outcome"] = type(exc).__name__
            result["message"] = str(exc)[:500]
    finally:
        report_and_wait(out, "machine", rank, world, result, TIMEOUT)
        dist.destroy_process_group()


def test_machine_offline_with_the_ordinary_checkpoint_cached_does_not_hang(
    saved, hub_repo_id, hub_api, tmp_path
):
    """The folder holds a sharded checkpoint and its consolidation (``consolidate_to``). Machine 0 downloads the
    sharded manifest; machine 1, offline, finds only the ordinary manifest of the same commit in its cache. The
    commit agrees, the manifests do not: machine 0 enters ``machine_files``'s collectives, machine 1 skips them.
    Both must end (loaded or a CheckpointError on both), none may wait in a collective the other never joins."""
    from huggingface_hub import hf_hub_download

    folder = tmp_path / "both"
    shutil.copytree(os.path.join(saved, "ckpt"), folder)
    hf_optim.consolidate_state(os.path.join(saved, "ckpt"), tmp_path / "v1")
    for name in os.listdir(tmp_path / "v1"):
        shutil.copy(tmp_path / "v1" / name, folder / name)
    upload_run(hub_api, hub_repo_id, str(folder))
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(saved, "at_save.safetensors"), out / "at_save.safetensors")
    for name in os.listdir(tmp_path / "v1"):  # machine 1 once downloaded the ordinary checkpoint
        hf_hub_download(hub_repo_id, f"run/{name}", cache_dir=str(out / "machine1"))
    results = run_with_deadline(
        _offline_worker, 2, (f"hf://{hub_repo_id}/run", str(out)), out, "machine", TIMEOUT
    )
    # machine 1 could only see the ordinary manifest; machine 0 took the sharded one
    assert not list((out / "machine1").rglob(SHARDED_MANIFEST_NAME))
    assert list((out / "machine0").rglob(SHARDED_MANIFEST_NAME))
    outcomes = {r.get("outcome") for r in results}
    assert outcomes in ({"CheckpointError"}, {"loaded"}), results
