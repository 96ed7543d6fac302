"""Multi-process FSDP2 runs for the sharded-state tests: the model, its training, the jobs each process runs
(``spawn_job``) and the run's recorded weights. Shared by tests/state and tests/security."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state import load_state
from hf_optim.state.sharded import (
    SHARDED_MANIFEST_NAME,
    save_sharded_state,
)
from tests.multiprocess import end_process_group, free_port, run_workers, start_workers

STEPS_BEFORE, STEPS_AFTER, GLOBAL_BATCH = 3, 3, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per]


def params_of(snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights in a snapshot (``param.<name>`` entries), as a state dict."""
    return {k.removeprefix("param."): v for k, v in snapshot.items() if k.startswith("param.")}


def weights_from(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model weights a saving run recorded in ``path`` (see ``run_snapshot``)."""
    return params_of(load_file(path))


def train(model, opt, sched, steps, rank, world):
    for step in steps:
        loss = model(batch(step, rank, world)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def train_accumulating(model, opt, sched, acc, micro_steps, rank, world):
    """Two micro-batches per optimizer step through a GradientAccumulator; ``micro_steps`` counts micro-batches."""
    for micro in micro_steps:
        loss = model(batch(100 + micro, rank, world)).pow(2).mean()
        loss.backward()
        acc.accumulate_from(model)
        if micro % 2 == 1:
            acc.apply_to(model)
            opt.step()
            sched.step()
            opt.zero_grad()


def accumulated(acc) -> dict[str, torch.Tensor]:
    return {f"acc.{i}": _full(g) for i, g in enumerate(acc.gradients) if g is not None}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def make_run(world: int, weights: dict | None):
    model = _model()
    if weights is not None:
        model.load_state_dict(weights)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, correct_bias=False)
    sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
    return model, opt, sched


def run_snapshot(model, opt) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": _full(p) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, entries in opt.state.items():
        for k, v in entries.items():
            out[f"state.{names[id(p)]}.{k}"] = (
                _full(v).reshape(-1) if torch.is_tensor(v) else torch.tensor([v])
            )
    return out


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _job(rank, world, job, out)  # its sharded models go with its frame, before the group is destroyed
    finally:
        end_process_group()
    Path(out, f".finished-{os.getpid()}").write_text(job)  # the job and the group's teardown are over


def _job(rank: int, world: int, job: str, out: str) -> None:
    if job == "save":
        model, opt, sched = make_run(world, None)
        train(model, opt, sched, range(STEPS_BEFORE), rank, world)
        save_sharded_state(os.path.join(out, "ckpt"), opt, sched, model=model)
        snap = run_snapshot(model, opt)
        train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = run_snapshot(model, opt)
        if rank == 0:
            save_file(snap, os.path.join(out, "at_save.safetensors"))
            save_file(final, os.path.join(out, f"final_{world}.safetensors"))
    elif job == "resume":
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = make_run(world, weights)
        load_state(os.path.join(out, "ckpt"), opt, sched, model=model)
        loaded = run_snapshot(model, opt)
        lr = torch.tensor([g["lr"] for g in opt.param_groups] + [sched.last_epoch], dtype=torch.float64)
        train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = run_snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"loaded_{world}.safetensors"))
            save_file({"lr": lr}, os.path.join(out, f"lr_{world}.safetensors"))
            save_file(final, os.path.join(out, f"resumed_{world}.safetensors"))
    elif job == "acc-save":  # saved in the middle of an accumulation window
        model, opt, sched = make_run(world, None)
        acc = hf_optim.GradientAccumulator()
        train_accumulating(model, opt, sched, acc, range(2 * STEPS_BEFORE + 1), rank, world)
        hf_optim.save_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
        snap = {**run_snapshot(model, opt), **accumulated(acc)}
        train_accumulating(
            model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), rank, world
        )
        final = run_snapshot(model, opt)
        if rank == 0:
            save_file(snap, os.path.join(out, "acc_at_save.safetensors"))
            save_file(final, os.path.join(out, "acc_final.safetensors"))
    elif job == "acc-resume":
        weights = weights_from(os.path.join(out, "acc_at_save.safetensors"))
        model, opt, sched = make_run(world, weights)
        acc = hf_optim.GradientAccumulator()
        report = hf_optim.load_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
        assert report.accumulator_loaded and acc.step == 1
        loaded = {**run_snapshot(model, opt), **accumulated(acc)}
        train_accumulating(
            model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), rank, world
        )
        final = run_snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"acc_loaded_{world}.safetensors"))
            save_file(final, os.path.join(out, f"acc_resumed_{world}.safetensors"))
    elif job.startswith("machines:"):  # each process plays a machine of its own, with its own HF cache
        os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = make_run(world, weights)
        cache = os.path.join(out, f"machine{rank}")
        hf_optim.load_state(job.removeprefix("machines:"), opt, sched, model=model, cache_dir=cache)
        loaded = run_snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, "machines_loaded.safetensors"))
    elif job == "resume-v1":  # an ordinary (consolidated) checkpoint into FSDP2, through the public API
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = make_run(world, weights)
        hf_optim.load_state(os.path.join(out, "v1"), opt, sched, model=model)
        loaded = run_snapshot(model, opt)
        train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = run_snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"loaded_v1_{world}.safetensors"))
            save_file(final, os.path.join(out, f"resumed_v1_{world}.safetensors"))
    elif job == "public":  # hf_optim.save_state / load_state pick the sharded format for DTensor state
        model, opt, sched = make_run(world, None)
        train(model, opt, sched, range(STEPS_BEFORE), rank, world)
        hf_optim.save_state(os.path.join(out, "public"), opt, sched, model=model)
        model2, opt2, sched2 = make_run(world, None)
        report = hf_optim.load_state(os.path.join(out, "public"), opt2, sched2, model=model2)
        trained, loaded = run_snapshot(model, opt), run_snapshot(model2, opt2)
        state_keys = [k for k in trained if k.startswith("state.")]
        same = loaded.keys() == trained.keys() and all(torch.equal(trained[k], loaded[k]) for k in state_keys)
        if rank == 0:
            with open(os.path.join(out, "public.json"), "w") as f:
                json.dump({"same": same, "complete": report.complete, "loaded": len(report.loaded)}, f)
    elif job.startswith("hub:"):  # push from every process (one commit), resume from hf:// on 3 processes
        repo = job.removeprefix("hub:")
        if world == 2:
            model, opt, sched = make_run(world, None)
            train(model, opt, sched, range(STEPS_BEFORE), rank, world)
            info = hf_optim.push_state_to_hub(repo, opt, sched, model=model, subfolder="step-3")
            pushed = run_snapshot(model, opt)  # a collective: every rank
            if rank == 0:
                save_file(pushed, os.path.join(out, "hub_pushed.safetensors"))
                Path(out, "hub_commit.txt").write_text(info.oid)
            else:
                assert info is None
        else:
            model, opt, sched = make_run(world, None)
            hf_optim.load_state(f"hf://{repo}/step-3", opt, sched, model=model)
            loaded = run_snapshot(model, opt)
            if rank == 0:
                save_file(loaded, os.path.join(out, "hub_loaded.safetensors"))
    elif job.startswith("kill"):
        # a save that dies on one rank: "kill-write" in the middle of rank 1's shard writing,
        # "kill-manifest" on rank 0 after the shards are in place but before the manifest is
        import hf_optim.state.sharded._save as sharded  # fault injection into the writer

        model, opt, sched = make_run(world, None)
        train(model, opt, sched, range(STEPS_BEFORE + 1), rank, world)
        if job == "kill-write" and rank == 1:
            original = sharded.save_file

            def dying_save_file(tensors, path, metadata=None):
                original(dict(list(tensors.items())[:1]), path, metadata=metadata)
                os._exit(3)

            sharded.save_file = dying_save_file
        if job == "kill-manifest" and rank == 0:

            def dying_dump(*args, **kwargs):
                os._exit(3)

            sharded.json.dump = dying_dump
        save_sharded_state(os.path.join(out, "ckpt"), opt, sched, model=model)
    elif job == "corrupt":
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = make_run(world, weights)
        before = run_snapshot(model, opt)
        try:
            load_state(os.path.join(out, "bad"), opt, sched, model=model)
            message = "loaded"
        except CheckpointError as exc:
            message = str(exc)
        same = all(torch.equal(before[k], v) for k, v in run_snapshot(model, opt).items()) and not opt.state
        with open(os.path.join(out, f"corrupt_{rank}.json"), "w") as f:
            json.dump({"message": message, "unchanged": same}, f)


def spawn_dying(world: int, job: str, out: str) -> None:
    with pytest.raises(mp.ProcessExitedException):
        run_workers(_worker, (world, free_port(), job, out), world)


def spawn_job(world: int, job: str, out: str) -> None:
    """Run ``job`` on ``world`` processes. A process that aborts (SIGABRT) after its job and the process group's
    teardown are over is tolerated: torch/gloo can abort while the interpreter exits, under load ("terminate called
    without an active exception"), when no hf_optim code runs any more. Any earlier failure fails the test."""
    context = start_workers(_worker, (world, free_port(), job, out), world)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        finished = {int(p.name.removeprefix(".finished-")) for p in Path(out).glob(".finished-*")}
        if exc.signal_name != "SIGABRT" or exc.error_pid not in finished:
            raise
        for process in context.processes:  # the other processes, done or stopped by the abort
            process.join()


def copy_checkpoint(saved: str, dest: str, name: str, edit=None) -> str:
    """Copy checkpoint ``name`` of a run's folder to ``dest``, applying ``edit`` to its manifest's JSON."""
    shutil.copytree(os.path.join(saved, name), dest)
    if edit is not None:
        path = os.path.join(dest, SHARDED_MANIFEST_NAME)
        doc = json.loads(Path(path).read_text())
        edit(doc)
        Path(path).write_text(json.dumps(doc))
    return dest


def upload_run(hub_api, repo: str, folder: str) -> dict:
    """Upload ``folder`` to ``repo`` under ``run/``; returns its sharded manifest (or {})."""
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=folder, path_in_repo="run")
    manifest = Path(folder, SHARDED_MANIFEST_NAME)
    return json.loads(manifest.read_text()) if manifest.exists() else {}
