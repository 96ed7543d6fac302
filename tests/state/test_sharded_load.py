"""Sharded loads: a failed load leaves every live object exactly as it was, older manifests
without the chunk record still load, and partial Hub downloads fail on every process (never hang).

References: the state saved by the two-process run (gathered with ``full_tensor`` into ``acc_at_save`` /
``at_save``), the live objects' own tensors cloned before the load, and object identity.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state import load_state
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME
from tests.multiprocess import report_and_wait, run_with_deadline
from tests.state.sharded_jobs import make_run, run_snapshot, train_accumulating, upload_run, weights_from

TIMEOUT = 25  # seconds a multi-process test may take before it counts as a hang


@pytest.fixture
def saved(sharded_saves):
    """The session's two-process sharded saves (tests/conftest.py)."""
    return sharded_saves


def _weights(saved: str, name: str = "acc_at_save.safetensors") -> dict[str, torch.Tensor]:
    return weights_from(os.path.join(saved, name))


def _copy(saved: str, tmp_path, name: str = "acc", edit=None) -> str:
    bad = str(tmp_path / f"copy_{name}")
    shutil.copytree(os.path.join(saved, name), bad)
    if edit is not None:
        path = os.path.join(bad, SHARDED_MANIFEST_NAME)
        doc = json.loads(Path(path).read_text())
        edit(doc)
        Path(path).write_text(json.dumps(doc))
    return bad


def _live_objects(saved: str):
    """A plain model, optimizer, scheduler and accumulator that all hold state (mid-window, after steps)."""
    model, opt, sched = make_run(1, _weights(saved))
    acc = hf_optim.GradientAccumulator()
    train_accumulating(model, opt, sched, acc, range(3), 0, 1)  # one optimizer step, then half a window
    assert opt.state and acc.step == 1 and all(g is not None for g in acc.gradients)
    return model, opt, sched, acc


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _accumulator_refuses(doc):
    doc["accumulator"]["state"]["dict"]["step"] = -1  # well-formed JSON; GradientAccumulator refuses it


def test_failed_load_keeps_the_scheduler_driving_the_live_optimizer(saved, tmp_path):
    """The accumulator refuses its counters after the optimizer and scheduler took theirs: everything is rolled
    back, and the scheduler must still drive the very optimizer it was built on (not a copy of it)."""
    bad = _copy(saved, tmp_path, edit=_accumulator_refuses)
    model, opt, sched, acc = _live_objects(saved)
    with pytest.raises(CheckpointError, match="accumulator"):
        load_state(bad, opt, sched, acc, model=model)
    assert sched.optimizer is opt  # a deep copy of the optimizer would silently take every later lr change
    lr_before = opt.param_groups[0]["lr"]
    sched.step()
    assert opt.param_groups[0]["lr"] != lr_before  # the live optimizer follows the schedule


def test_failed_load_restores_optimizer_scheduler_and_accumulator_exactly(saved, tmp_path):
    bad = _copy(saved, tmp_path, edit=_accumulator_refuses)
    model, opt, sched, acc = _live_objects(saved)
    state_before = {n: _clone(opt.state[p]) for n, p in model.named_parameters()}
    state_objects = {n: dict(opt.state[p]) for n, p in model.named_parameters()}
    groups_before = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sched_before = _clone({k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"})
    acc_before = _clone(acc.state_dict())
    acc_buffers = list(acc.gradients)
    with pytest.raises(CheckpointError, match="accumulator"):
        load_state(bad, opt, sched, acc, model=model)
    for n, p in model.named_parameters():
        assert _same(dict(opt.state[p]), state_before[n]), n
        assert all(opt.state[p][k] is v for k, v in state_objects[n].items()), n  # the same tensors
    assert len(opt.param_groups) == len(groups_before)
    for live, before in zip(opt.param_groups, groups_before, strict=True):
        assert _same({k: v for k, v in live.items() if k != "params"}, before)
    assert _same({k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}, sched_before)
    assert _same(acc.state_dict(), acc_before)
    assert all(a is b for a, b in zip(acc.gradients, acc_buffers, strict=True))


def test_failed_load_keeps_the_param_group_objects(saved, tmp_path):
    """Code holding a live param group (a wrapper, a custom lr rule) must still see the optimizer's group."""
    bad = _copy(saved, tmp_path, edit=_accumulator_refuses)
    model, opt, sched, acc = _live_objects(saved)
    groups = list(opt.param_groups)
    with pytest.raises(CheckpointError, match="accumulator"):
        load_state(bad, opt, sched, acc, model=model)
    assert all(a is b for a, b in zip(opt.param_groups, groups, strict=True))


def _strip_chunks(doc):
    for record in doc["state"].values():
        for entry in record.values():
            entry.pop("chunks", None)
    for entry in (doc.get("accumulator") or {}).get("gradients", []):
        if entry is not None:
            entry.pop("chunks", None)


def test_manifest_without_chunk_records_still_loads(saved, tmp_path):
    """A format-version-2 manifest written before the chunk record: planned from every shard header."""
    old = _copy(saved, tmp_path, edit=_strip_chunks)
    model, opt, sched = make_run(1, _weights(saved))
    acc = hf_optim.GradientAccumulator()
    hf_optim.load_state(old, opt, sched, acc, model=model)
    at_save = load_file(os.path.join(saved, "acc_at_save.safetensors"))
    loaded = {
        **run_snapshot(model, opt),
        **{f"acc.{i}": g for i, g in enumerate(acc.gradients) if g is not None},
    }
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key


def test_accumulator_continues_with_the_model_after_a_load(saved, tmp_path):
    """A loaded accumulator takes the model's next micro-batch: a record with more gradients than the model has
    parameters (a trailing ``null``) must be refused at load, not break training later."""

    def longer(doc):
        doc["accumulator"]["gradients"].append(None)

    bad = _copy(saved, tmp_path, edit=longer)
    model, opt, sched = make_run(1, _weights(saved))
    acc = hf_optim.GradientAccumulator()
    try:
        hf_optim.load_state(bad, opt, sched, acc, model=model)
    except CheckpointError:
        assert not opt.state and acc.step == 0
        return
    model(torch.randn(2, 5)).pow(2).mean().backward()
    acc.accumulate_from(model)  # the second micro-batch of the saved window
    acc.apply_to(model)


# ---------------------------------------------------------------------------------------------------------------
# Partial Hub downloads: each process plays a machine with its own cache
# ---------------------------------------------------------------------------------------------------------------


def _local(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _machine_worker(rank: int, world: int, port: int, url: str, out: str, revisions: list | None) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0", GROUP_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT - 10))
    result: dict = {}
    try:
        model, opt, sched = make_run(world, _weights(out, "at_save.safetensors"))
        before = _local(model)
        try:
            revision = revisions[rank] if revisions else None
            cache = os.path.join(out, f"machine{rank}")
            hf_optim.load_state(url, opt, sched, model=model, cache_dir=cache, revision=revision)
            result["outcome"] = "loaded"
            at_save = load_file(os.path.join(out, "at_save.safetensors"))
            result["exact"] = all(torch.equal(run_snapshot(model, opt)[k], v) for k, v in at_save.items())
        except Exception as exc:
            result["outcome"] = type(exc).__name__
            result["message"] = str(exc)[:500]
            # this process's own parameter shards only: a collective here could meet another rank's pending one
            result["unchanged"] = not opt.state and all(
                torch.equal(before[k], v) for k, v in _local(model).items()
            )
    finally:
        report_and_wait(out, "machine", rank, world, result, TIMEOUT)
        dist.destroy_process_group()


def _run_machines(world: int, url: str, out: str, revisions: list | None = None) -> list[dict]:
    """Run ``_machine_worker`` on ``world`` processes; a process still running after ``TIMEOUT`` s is a hang."""
    return run_with_deadline(_machine_worker, world, (url, out, revisions), out, "machine", TIMEOUT)


def test_needed_file_absent_from_the_hub_fails_on_every_machine(saved, hub_repo_id, hub_api, tmp_path):
    """Machine 1 reads shard 2, which the manifest lists but the repository does not have: both machines raise
    a CheckpointError naming it, nothing changes, and nobody waits forever."""
    folder = _copy(saved, tmp_path, name="ckpt")
    doc = json.loads(Path(folder, SHARDED_MANIFEST_NAME).read_text())
    missing = doc["shards"]["files"][1]
    os.remove(os.path.join(folder, doc["shards"]["folder"], missing))
    upload_run(hub_api, hub_repo_id, folder)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(saved, "at_save.safetensors"), out / "at_save.safetensors")
    results = _run_machines(2, f"hf://{hub_repo_id}/run", str(out))
    for rank, result in enumerate(results):
        assert result["outcome"] == "CheckpointError", (rank, result)
        assert result["unchanged"], (rank, result)
    assert missing in results[1]["message"]


def test_hub_manifest_without_chunk_records_downloads_every_file(saved, hub_repo_id, hub_api, tmp_path):
    folder = _copy(saved, tmp_path, name="ckpt", edit=_strip_chunks)
    doc = upload_run(hub_api, hub_repo_id, folder)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(saved, "at_save.safetensors"), out / "at_save.safetensors")
    results = _run_machines(2, f"hf://{hub_repo_id}/run", str(out))
    assert all(r.get("outcome") == "loaded" and r.get("exact") for r in results), results
    for machine in range(2):
        cached = sorted(
            p.name for p in (out / f"machine{machine}").rglob("*.safetensors") if "snapshots" in p.parts
        )
        assert cached == sorted(doc["shards"]["files"])


def test_present_unlisted_shard_file_is_refused(saved, tmp_path):
    """A shard file the manifest does not list, present in the shard folder, is refused (chunk-record plan)."""
    model, opt, sched = make_run(1, _weights(saved, "at_save.safetensors"))
    folder = _copy(saved, tmp_path, name="ckpt")
    doc = json.loads(Path(folder, SHARDED_MANIFEST_NAME).read_text())
    shard_dir = os.path.join(folder, doc["shards"]["folder"])
    extra = os.path.join(shard_dir, "shard-00007-model-00001-of-00001.safetensors")
    shutil.copy(os.path.join(shard_dir, doc["shards"]["files"][0]), extra)
    with pytest.raises(CheckpointError, match="unlisted"):
        load_state(folder, opt, sched, model=model)
    assert not opt.state


def test_consolidated_accumulator_checkpoint_resumes_the_accumulator(saved, tmp_path):
    """A checkpoint saved mid-window, consolidated for one process, must still resume the accumulator (or the
    consolidation must refuse to drop it): the window's gradients are part of the state."""
    from hf_optim.state import consolidate_state

    out = str(tmp_path / "consolidated")
    consolidate_state(os.path.join(saved, "acc"), out)
    model, opt, sched = make_run(1, _weights(saved))
    acc = hf_optim.GradientAccumulator()
    hf_optim.load_state(out, opt, sched, acc, model=model)
    at_save = load_file(os.path.join(saved, "acc_at_save.safetensors"))
    assert acc.step == 1
    for i, g in enumerate(acc.gradients):
        assert torch.equal(g, at_save[f"acc.{i}"]), i


def test_branch_moved_between_two_machines_downloads(saved, hub_repo_id, hub_api, tmp_path):
    """Each machine resolves the revision on its own. If the branch moves between their downloads (a training job
    pushing while another resumes), machine 0 sees the sharded checkpoint and machine 1 the ordinary one that
    replaced it. Simulated by pointing each process at the
    commit it would have resolved (a branch each). The processes must all
    raise (or all load one checkpoint), never run different collectives and hang."""
    from hf_optim.state import consolidate_state

    upload_run(hub_api, hub_repo_id, _copy(saved, tmp_path, name="ckpt"))
    hub_api.create_branch(
        hub_repo_id, branch="before", revision=hub_api.list_repo_commits(hub_repo_id)[0].commit_id
    )
    ordinary = str(tmp_path / "ordinary")
    consolidate_state(os.path.join(saved, "ckpt"), ordinary)
    hub_api.delete_folder("run", repo_id=hub_repo_id)
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=ordinary, path_in_repo="run")
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(saved, "at_save.safetensors"), out / "at_save.safetensors")
    # branch names, not commit ids: each cache then has its refs/ (see test_load_from_the_hub_at_a_commit)
    results = _run_machines(2, f"hf://{hub_repo_id}/run", str(out), ["before", "main"])
    outcomes = {r.get("outcome") for r in results}
    assert outcomes in ({"CheckpointError"}, {"loaded"}), results


def test_plain_process_loads_a_sharded_checkpoint_from_the_hub(saved, hub_repo_id, hub_api):
    """2 -> 1 through the Hub: one plain process (no process group) downloads every shard and restores exactly."""
    upload_run(hub_api, hub_repo_id, os.path.join(saved, "ckpt"))
    model, opt, sched = make_run(1, _weights(saved, "at_save.safetensors"))
    hf_optim.load_state(f"hf://{hub_repo_id}/run", opt, sched, model=model)
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in run_snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key


@pytest.mark.parametrize("name", ["ckpt", "v1"])
def test_load_from_the_hub_at_a_commit(saved, hub_repo_id, hub_api, tmp_path, name):
    """``revision=<commit sha>`` (pinning what to resume): huggingface_hub writes no ``refs/`` for a commit, and
    the cache's blobs must still count as the checkpoint's folder."""
    from hf_optim.state import consolidate_state

    folder = os.path.join(saved, "ckpt")
    if name == "v1":
        folder = str(tmp_path / "v1")
        consolidate_state(os.path.join(saved, "ckpt"), folder)
    upload_run(hub_api, hub_repo_id, folder)
    commit = hub_api.list_repo_commits(hub_repo_id)[0].commit_id
    model, opt, sched = make_run(1, _weights(saved, "at_save.safetensors"))
    hf_optim.load_state(
        f"hf://{hub_repo_id}/run", opt, sched, model=model, revision=commit, cache_dir=str(tmp_path / "cache")
    )
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in run_snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key
