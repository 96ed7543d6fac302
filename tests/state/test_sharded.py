"""Sharded (FSDP2) optimizer state: save on N processes, resume on N, M or one plain process.

Every multi-process run is compared with a reference run of the same global batch: the uninterrupted run on the
same number of processes for bit-exact continuation, and the loaded state against the saved state (gathered with
``full_tensor`` in the saving run) for exact restoration on another number of processes.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import threading
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
    inspect_sharded_state,
    save_sharded_state,
)

STEPS_BEFORE, STEPS_AFTER, GLOBAL_BATCH = 3, 3, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batch(step: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per]


def _params_of(snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights in a snapshot (``param.<name>`` entries), as a state dict."""
    return {k.removeprefix("param."): v for k, v in snapshot.items() if k.startswith("param.")}


def weights_from(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model weights a saving run recorded in ``path`` (see ``_snapshot``)."""
    return _params_of(load_file(path))


def _train(model, opt, sched, steps, rank, world):
    for step in steps:
        loss = model(_batch(step, rank, world)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _train_accumulating(model, opt, sched, acc, micro_steps, rank, world):
    """Two micro-batches per optimizer step through a GradientAccumulator; ``micro_steps`` counts micro-batches."""
    for micro in micro_steps:
        loss = model(_batch(100 + micro, rank, world)).pow(2).mean()
        loss.backward()
        acc.accumulate_from(model)
        if micro % 2 == 1:
            acc.apply_to(model)
            opt.step()
            sched.step()
            opt.zero_grad()


def _accumulated(acc) -> dict[str, torch.Tensor]:
    return {f"acc.{i}": _full(g) for i, g in enumerate(acc.gradients) if g is not None}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _make(world: int, weights: dict | None):
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


def _snapshot(model, opt) -> dict[str, torch.Tensor]:
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
        _job(rank, world, job, out)
    finally:
        # the job's sharded models (their device mesh) hold the process group: with them released, the group
        # is torn down here rather than while the interpreter exits
        gc.collect()
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    Path(out, f".finished-{os.getpid()}").write_text(job)  # the job and the group's teardown are over


def _job(rank: int, world: int, job: str, out: str) -> None:
    if job == "save":
        model, opt, sched = _make(world, None)
        _train(model, opt, sched, range(STEPS_BEFORE), rank, world)
        save_sharded_state(os.path.join(out, "ckpt"), opt, sched, model=model)
        snap = _snapshot(model, opt)
        _train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = _snapshot(model, opt)
        if rank == 0:
            save_file(snap, os.path.join(out, "at_save.safetensors"))
            save_file(final, os.path.join(out, f"final_{world}.safetensors"))
    elif job == "resume":
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = _make(world, weights)
        load_state(os.path.join(out, "ckpt"), opt, sched, model=model)
        loaded = _snapshot(model, opt)
        lr = torch.tensor([g["lr"] for g in opt.param_groups] + [sched.last_epoch], dtype=torch.float64)
        _train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = _snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"loaded_{world}.safetensors"))
            save_file({"lr": lr}, os.path.join(out, f"lr_{world}.safetensors"))
            save_file(final, os.path.join(out, f"resumed_{world}.safetensors"))
    elif job == "acc-save":  # saved in the middle of an accumulation window
        model, opt, sched = _make(world, None)
        acc = hf_optim.GradientAccumulator()
        _train_accumulating(model, opt, sched, acc, range(2 * STEPS_BEFORE + 1), rank, world)
        hf_optim.save_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
        snap = {**_snapshot(model, opt), **_accumulated(acc)}
        _train_accumulating(
            model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), rank, world
        )
        final = _snapshot(model, opt)
        if rank == 0:
            save_file(snap, os.path.join(out, "acc_at_save.safetensors"))
            save_file(final, os.path.join(out, "acc_final.safetensors"))
    elif job == "acc-resume":
        weights = weights_from(os.path.join(out, "acc_at_save.safetensors"))
        model, opt, sched = _make(world, weights)
        acc = hf_optim.GradientAccumulator()
        report = hf_optim.load_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
        assert report.accumulator_loaded and acc.step == 1
        loaded = {**_snapshot(model, opt), **_accumulated(acc)}
        _train_accumulating(
            model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), rank, world
        )
        final = _snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"acc_loaded_{world}.safetensors"))
            save_file(final, os.path.join(out, f"acc_resumed_{world}.safetensors"))
    elif job.startswith("machines:"):  # each process plays a machine of its own, with its own HF cache
        os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = _make(world, weights)
        cache = os.path.join(out, f"machine{rank}")
        hf_optim.load_state(job.removeprefix("machines:"), opt, sched, model=model, cache_dir=cache)
        loaded = _snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, "machines_loaded.safetensors"))
    elif job == "resume-v1":  # an ordinary (consolidated) checkpoint into FSDP2, through the public API
        weights = weights_from(os.path.join(out, "at_save.safetensors"))
        model, opt, sched = _make(world, weights)
        hf_optim.load_state(os.path.join(out, "v1"), opt, sched, model=model)
        loaded = _snapshot(model, opt)
        _train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), rank, world)
        final = _snapshot(model, opt)
        if rank == 0:
            save_file(loaded, os.path.join(out, f"loaded_v1_{world}.safetensors"))
            save_file(final, os.path.join(out, f"resumed_v1_{world}.safetensors"))
    elif job == "public":  # hf_optim.save_state / load_state pick the sharded format for DTensor state
        model, opt, sched = _make(world, None)
        _train(model, opt, sched, range(STEPS_BEFORE), rank, world)
        hf_optim.save_state(os.path.join(out, "public"), opt, sched, model=model)
        model2, opt2, sched2 = _make(world, None)
        report = hf_optim.load_state(os.path.join(out, "public"), opt2, sched2, model=model2)
        trained, loaded = _snapshot(model, opt), _snapshot(model2, opt2)
        state_keys = [k for k in trained if k.startswith("state.")]
        same = loaded.keys() == trained.keys() and all(torch.equal(trained[k], loaded[k]) for k in state_keys)
        if rank == 0:
            with open(os.path.join(out, "public.json"), "w") as f:
                json.dump({"same": same, "complete": report.complete, "loaded": len(report.loaded)}, f)
    elif job.startswith("hub:"):  # push from every process (one commit), resume from hf:// on 3 processes
        repo = job.removeprefix("hub:")
        if world == 2:
            model, opt, sched = _make(world, None)
            _train(model, opt, sched, range(STEPS_BEFORE), rank, world)
            info = hf_optim.push_state_to_hub(repo, opt, sched, model=model, subfolder="step-3")
            pushed = _snapshot(model, opt)  # a collective: every rank
            if rank == 0:
                save_file(pushed, os.path.join(out, "hub_pushed.safetensors"))
                Path(out, "hub_commit.txt").write_text(info.oid)
            else:
                assert info is None
        else:
            model, opt, sched = _make(world, None)
            hf_optim.load_state(f"hf://{repo}/step-3", opt, sched, model=model)
            loaded = _snapshot(model, opt)
            if rank == 0:
                save_file(loaded, os.path.join(out, "hub_loaded.safetensors"))
    elif job.startswith("kill"):
        # a save that dies on one rank: "kill-write" in the middle of rank 1's shard writing,
        # "kill-manifest" on rank 0 after the shards are in place but before the manifest is
        import hf_optim.state.sharded._save as sharded  # fault injection into the writer

        model, opt, sched = _make(world, None)
        _train(model, opt, sched, range(STEPS_BEFORE + 1), rank, world)
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
        model, opt, sched = _make(world, weights)
        before = _snapshot(model, opt)
        try:
            load_state(os.path.join(out, "bad"), opt, sched, model=model)
            message = "loaded"
        except CheckpointError as exc:
            message = str(exc)
        same = all(torch.equal(before[k], v) for k, v in _snapshot(model, opt).items()) and not opt.state
        with open(os.path.join(out, f"corrupt_{rank}.json"), "w") as f:
            json.dump({"message": message, "unchanged": same}, f)


def _spawn_dying(world: int, job: str, out: str) -> None:
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_worker, args=(world, _free_port(), job, out), nprocs=world, join=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, job: str, out: str) -> None:
    """Run ``job`` on ``world`` processes. A process that aborts (SIGABRT) after its job and the process group's
    teardown are over is tolerated: torch/gloo can abort while the interpreter exits, under load ("terminate called
    without an active exception"), when no hf_optim code runs any more. Any earlier failure fails the test."""
    context = mp.start_processes(
        _worker, args=(world, _free_port(), job, out), nprocs=world, join=False, start_method="spawn"
    )
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        finished = {int(p.name.removeprefix(".finished-")) for p in Path(out).glob(".finished-*")}
        if exc.signal_name != "SIGABRT" or exc.error_pid not in finished:
            raise
        for process in context.processes:  # the other processes, done or stopped by the abort
            process.join()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    _spawn(2, "save", out)
    return out


@pytest.fixture(scope="module")
def saved3(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded3"))
    _spawn(3, "save", out)
    return out


def _plain_resume(out: str) -> tuple[dict, dict]:
    weights = weights_from(os.path.join(out, "at_save.safetensors"))
    model, opt, sched = _make(1, weights)
    load_state(os.path.join(out, "ckpt"), opt, sched, model=model)
    loaded = _snapshot(model, opt)
    _train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), 0, 1)
    return loaded, _snapshot(model, opt)


def test_files_are_safetensors_and_json_only(saved):
    ckpt = os.path.join(saved, "ckpt")
    manifest = json.loads(Path(os.path.join(ckpt, SHARDED_MANIFEST_NAME)).read_text())
    shard_dir = os.path.join(ckpt, manifest["shards"]["folder"])
    assert sorted(os.listdir(ckpt)) == sorted([SHARDED_MANIFEST_NAME, manifest["shards"]["folder"]])
    assert sorted(os.listdir(shard_dir)) == manifest["shards"]["files"]
    assert len(manifest["shards"]["files"]) == 2 and all(
        f.endswith(".safetensors") for f in os.listdir(shard_dir)
    )
    info = inspect_sharded_state(ckpt)
    assert info.num_shards == 2 and info.world_size == 2
    assert info.parameters["0.weight"]["exp_avg"] == (7, 5)


@pytest.mark.parametrize("world", [2, 3])
def test_resume_on_n_processes(saved, world):
    _spawn(world, "resume", saved)
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    loaded = load_file(os.path.join(saved, f"loaded_{world}.safetensors"))
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():  # the restored state is exact on any number of processes
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(saved, "final_2.safetensors"))
    resumed = load_file(os.path.join(saved, f"resumed_{world}.safetensors"))
    for key, value in final.items():
        if world == 2:  # same reductions: bit for bit
            assert torch.equal(resumed[key], value), key
        else:
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    lr = load_file(os.path.join(saved, f"lr_{world}.safetensors"))["lr"]
    # linear schedule, 2 warmup steps of 20: lr = 1e-2 * (20 - t) / (20 - 2) at t = STEPS_BEFORE
    assert lr[0].item() == pytest.approx(1e-2 * (20 - STEPS_BEFORE) / 18, rel=1e-12)
    assert lr[-1].item() == STEPS_BEFORE


def test_save_on_three_resume_on_two(saved3):
    _spawn(2, "resume", saved3)
    at_save = load_file(os.path.join(saved3, "at_save.safetensors"))
    loaded = load_file(os.path.join(saved3, "loaded_2.safetensors"))
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(saved3, "final_3.safetensors"))  # the uninterrupted 3-process run
    resumed = load_file(os.path.join(saved3, "resumed_2.safetensors"))
    for key, value in final.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    assert inspect_sharded_state(os.path.join(saved3, "ckpt")).num_shards == 3


@pytest.fixture(scope="module")
def saved_accumulating(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("accumulating"))
    _spawn(2, "acc-save", out)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_accumulator_saved_mid_window_resumes(saved_accumulating, world):
    out = saved_accumulating
    if world == 1:
        _worker_plain_accumulating(out)
    else:
        _spawn(world, "acc-resume", out)
    at_save = load_file(os.path.join(out, "acc_at_save.safetensors"))
    loaded = load_file(os.path.join(out, f"acc_loaded_{world}.safetensors"))
    assert loaded.keys() == at_save.keys() and any(k.startswith("acc.") for k in at_save)
    for key, value in at_save.items():  # the half-accumulated gradients and the state, exactly
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(out, "acc_final.safetensors"))
    resumed = load_file(os.path.join(out, f"acc_resumed_{world}.safetensors"))
    for key, value in final.items():
        if world == 2:
            assert torch.equal(resumed[key], value), key
        else:
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    manifest = json.loads(Path(out, "acc", SHARDED_MANIFEST_NAME).read_text())
    assert manifest["accumulator"]["class"] == "hf_optim.accumulation.GradientAccumulator"
    assert (
        inspect_sharded_state(os.path.join(out, "acc")).accumulator_gradients == 4
    )  # the model's 4 parameters


def test_consolidated_checkpoint_keeps_the_accumulator(saved_accumulating, tmp_path):
    from hf_optim.state import consolidate_state

    written = consolidate_state(os.path.join(saved_accumulating, "acc"), tmp_path / "v1")
    assert any(p.endswith("accumulator.safetensors") for p in written)
    at_save = load_file(os.path.join(saved_accumulating, "acc_at_save.safetensors"))
    weights = _params_of(at_save)
    model, opt, sched = _make(1, weights)
    acc = hf_optim.GradientAccumulator()
    report = hf_optim.load_state(tmp_path / "v1", opt, sched, acc, model=model)
    assert report.complete and report.accumulator_loaded and acc.step == 1
    loaded = {**_snapshot(model, opt), **_accumulated(acc)}
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key


def _worker_plain_accumulating(out: str) -> None:
    weights = weights_from(os.path.join(out, "acc_at_save.safetensors"))
    model, opt, sched = _make(1, weights)
    acc = hf_optim.GradientAccumulator()
    hf_optim.load_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
    loaded = {**_snapshot(model, opt), **_accumulated(acc)}
    _train_accumulating(model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), 0, 1)
    save_file(loaded, os.path.join(out, "acc_loaded_1.safetensors"))
    save_file(_snapshot(model, opt), os.path.join(out, "acc_resumed_1.safetensors"))


def test_accumulator_mismatch_changes_nothing(saved_accumulating, saved):
    weights = weights_from(os.path.join(saved_accumulating, "acc_at_save.safetensors"))
    model, opt, sched = _make(1, weights)
    acc = hf_optim.GradientAccumulator()
    acc([torch.zeros(3)])  # one gradient accumulated: the checkpoint has four
    with pytest.raises(CheckpointError, match="has 4 gradients, the accumulator 1"):
        hf_optim.load_state(os.path.join(saved_accumulating, "acc"), opt, sched, acc, model=model)
    assert not opt.state and acc.step == 1 and torch.equal(acc.gradients[0], torch.zeros(3))
    with pytest.raises(CheckpointError, match="no accumulator state but an accumulator was given"):
        hf_optim.load_state(os.path.join(saved, "ckpt"), opt, sched, acc, model=model)
    assert not opt.state and acc.step == 1


def test_resume_on_one_plain_process(saved):
    loaded, resumed = _plain_resume(saved)
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(saved, "final_2.safetensors"))
    for key, value in final.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def _corrupt_copy(saved: str, name: str, edit) -> str:
    bad = os.path.join(saved, "bad")
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(os.path.join(saved, "ckpt"), bad)
    edit(bad)
    return bad


def _manifest_edit(fn):
    def edit(bad):
        path = os.path.join(bad, SHARDED_MANIFEST_NAME)
        doc = json.loads(Path(path).read_text())
        fn(doc)
        Path(path).write_text(json.dumps(doc))

    return edit


def _shard_dir(bad: str) -> str:
    doc = json.loads(Path(os.path.join(bad, SHARDED_MANIFEST_NAME)).read_text())
    return os.path.join(bad, doc["shards"]["folder"])


ATTACKS = {
    "missing shard": (
        lambda bad: os.remove(os.path.join(_shard_dir(bad), sorted(os.listdir(_shard_dir(bad)))[1])),
        "is missing",
    ),
    "unlisted shard": (
        lambda bad: shutil.copy(
            os.path.join(_shard_dir(bad), sorted(os.listdir(_shard_dir(bad)))[0]),
            os.path.join(_shard_dir(bad), "shard-00009-model-00001-of-00001.safetensors"),
        ),
        "differ from the manifest",
    ),
    "duplicated shard": (
        lambda bad: shutil.copy(
            *[os.path.join(_shard_dir(bad), f) for f in sorted(os.listdir(_shard_dir(bad)))]
        ),
        "chunks of .* differ from the manifest",
    ),
    "chunk recorded twice": (
        _manifest_edit(
            lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"].append(
                d["state"]["0.weight"]["exp_avg"]["chunks"][0]
            )
        ),
        "two chunks recorded|overlap",
    ),
    "chunk missing from the record": (
        _manifest_edit(lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"].pop()),
        "cover",
    ),
    "chunk record names an unlisted file": (
        _manifest_edit(
            lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"][0].update(file="../../x.safetensors")
        ),
        "listed shard file",
    ),
    "chunk record swaps files": (
        _manifest_edit(
            lambda d: [
                c.update(file=d["shards"]["files"][1 - d["shards"]["files"].index(c["file"])])
                for c in d["state"]["0.weight"]["exp_avg"]["chunks"]
            ]
        ),
        "differ from the manifest",
    ),
    "chunk record on some tensors only": (
        _manifest_edit(lambda d: d["state"]["0.weight"]["exp_avg"].pop("chunks")),
        "others do not",
    ),
    "chunk outside the tensor": (
        _manifest_edit(lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"][-1].update(offsets=[6, 0])),
        "outside",
    ),
    "global shape": (
        _manifest_edit(lambda d: d["state"]["0.weight"]["exp_avg"].update(shape=[8, 5])),
        "0.weight",
    ),
    "hyperparameter type": (
        _manifest_edit(lambda d: d["param_groups"][0]["hyperparameters"]["dict"].update(lr="abc")),
        "'lr'",
    ),
    "injected hyperparameter": (
        _manifest_edit(lambda d: d["param_groups"][0]["hyperparameters"]["dict"].update(maximize=True)),
        "maximize",
    ),
    "reserved state key": (
        _manifest_edit(lambda d: d["state"]["0.weight"].update(params={"value": 1})),
        "reserved",
    ),
    "scheduler keys": (
        _manifest_edit(lambda d: d["scheduler"]["state_dict"]["dict"].update(injected=1)),
        "scheduler",
    ),
    "missing moment": (
        lambda bad: (
            _manifest_edit(lambda d: d["state"]["0.weight"].pop("exp_avg"))(bad),
            os.rename(_shard_dir(bad), _shard_dir(bad)),
        ),
        "exp_avg|0.weight",
    ),
    "negative base_lrs": (
        _manifest_edit(lambda d: d["scheduler"]["state_dict"]["dict"].update(base_lrs=[-5.0])),
        "base_lrs",
    ),
    "shard folder escapes": (_manifest_edit(lambda d: d["shards"].update(folder="../ckpt")), "shard folder"),
    "fifo manifest": (
        lambda bad: (
            os.remove(os.path.join(bad, SHARDED_MANIFEST_NAME)),
            os.mkfifo(os.path.join(bad, SHARDED_MANIFEST_NAME)),
        ),
        "not a regular file",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_checkpoint_changes_nothing(saved, attack):
    edit, expected = ATTACKS[attack]
    bad = _corrupt_copy(saved, attack, edit)
    weights = weights_from(os.path.join(saved, "at_save.safetensors"))
    model, opt, sched = _make(1, weights)
    before_sched = dict(sched.__dict__)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_state(bad, opt, sched, model=model)
    assert bad in str(info.value) or "bad" in str(info.value)
    assert not opt.state and sched.__dict__.keys() == before_sched.keys()
    assert all(sched.__dict__[k] == v for k, v in before_sched.items() if k != "optimizer")


def test_every_rank_raises_and_stays_unchanged(saved):
    _corrupt_copy(saved, "missing", ATTACKS["missing shard"][0])
    _spawn(2, "corrupt", saved)
    for rank in range(2):
        result = json.loads(Path(os.path.join(saved, f"corrupt_{rank}.json")).read_text())
        assert "is missing" in result["message"] and result["unchanged"], result


@pytest.mark.parametrize("job", ["kill-write", "kill-manifest"])
def test_save_killed_on_one_rank_keeps_the_previous_checkpoint(saved, tmp_path, job):
    shutil.copytree(os.path.join(saved, "ckpt"), tmp_path / "ckpt")
    shutil.copy(os.path.join(saved, "at_save.safetensors"), tmp_path / "at_save.safetensors")
    _spawn_dying(2, job, str(tmp_path))
    loaded, _ = _plain_resume(str(tmp_path))  # the previous checkpoint, whole
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    leftovers = [
        e for e in os.listdir(tmp_path / "ckpt") if e.endswith(".tmp") or e.startswith("optimizer-shards-")
    ]
    assert len(leftovers) >= 2  # the killed save's folder is still there, unreferenced...
    model, opt, sched = _make(1, None)
    _train(model, opt, sched, range(1), 0, 1)
    save_sharded_state(str(tmp_path / "ckpt"), opt, sched, model=model)  # ...until the next save removes it
    for thread in threading.enumerate():  # in the background
        if thread.name == "hf_optim-cleanup":
            thread.join()
    manifest = json.loads((tmp_path / "ckpt" / SHARDED_MANIFEST_NAME).read_text())
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(
        [SHARDED_MANIFEST_NAME, manifest["shards"]["folder"]]
    )


def test_consolidate_then_resume_into_fsdp2(saved):
    from hf_optim.state import consolidate_state

    consolidate_state(os.path.join(saved, "ckpt"), os.path.join(saved, "v1"))
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    # one plain process reads the consolidated checkpoint exactly
    weights = _params_of(at_save)
    model, opt, sched = _make(1, weights)
    hf_optim.load_state(os.path.join(saved, "v1"), opt, sched, model=model)
    for key, value in _snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key
    # and two FSDP2 processes each take their shard of it (1 -> 2), continuing bit for bit
    _spawn(2, "resume-v1", saved)
    loaded = load_file(os.path.join(saved, "loaded_v1_2.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(saved, "final_2.safetensors"))
    resumed = load_file(os.path.join(saved, "resumed_v1_2.safetensors"))
    for key, value in final.items():
        assert torch.equal(resumed[key], value), key


def test_public_save_and_load_state_choose_the_sharded_format(saved):
    _spawn(2, "public", saved)
    result = json.loads(Path(os.path.join(saved, "public.json")).read_text())
    assert result == {"same": True, "complete": True, "loaded": 4}
    assert os.path.isfile(os.path.join(saved, "public", SHARDED_MANIFEST_NAME))


def test_model_is_required_for_sharded_state(saved):
    _, opt, sched = _make(1, None)
    with pytest.raises(ValueError, match="model="):
        hf_optim.load_state(os.path.join(saved, "ckpt"), opt, sched)


def test_push_from_every_process_and_resume_from_the_hub(saved, hub_repo_id, hub_api, tmp_path):
    out = str(tmp_path)
    _spawn(2, f"hub:{hub_repo_id}", out)
    commits = hub_api.list_repo_commits(hub_repo_id)
    assert next(c.commit_id for c in commits) == Path(out, "hub_commit.txt").read_text()
    files = hub_api.list_repo_files(hub_repo_id)
    shards = [f for f in files if f.startswith("step-3/optimizer-shards-")]
    assert "step-3/optimizer.sharded.json" in files and len(shards) == 2
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".metadata")) or "/." in f]
    _spawn(3, f"hub:{hub_repo_id}", out)
    pushed = load_file(os.path.join(out, "hub_pushed.safetensors"))
    loaded = load_file(os.path.join(out, "hub_loaded.safetensors"))
    for key, value in pushed.items():
        if key.startswith("state."):
            assert torch.equal(loaded[key], value), key


def test_each_machine_downloads_only_the_shards_it_reads(saved, hub_repo_id, hub_api, tmp_path):
    hub_api.create_repo(hub_repo_id, exist_ok=True)
    hub_api.upload_folder(repo_id=hub_repo_id, folder_path=os.path.join(saved, "ckpt"), path_in_repo="run")
    manifest = json.loads(Path(saved, "ckpt", SHARDED_MANIFEST_NAME).read_text())
    shutil.copy(os.path.join(saved, "at_save.safetensors"), tmp_path / "at_save.safetensors")
    _spawn(2, f"machines:hf://{hub_repo_id}/run", str(tmp_path))
    for machine in range(2):
        cached = sorted(
            p.name for p in (tmp_path / f"machine{machine}").rglob("*.safetensors") if "snapshots" in p.parts
        )
        # FSDP2 splits the rows alike on save and on load: process r reads what process r wrote (shard r + 1)
        assert cached == [f for f in manifest["shards"]["files"] if f.startswith(f"shard-{machine + 1:05d}-")]
    loaded = load_file(tmp_path / "machines_loaded.safetensors")
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key


def test_cli_inspect_and_consolidate(saved, tmp_path):
    import subprocess
    import sys

    ckpt = os.path.join(saved, "ckpt")
    shown = subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "inspect", ckpt],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    manifest = json.loads(Path(ckpt, SHARDED_MANIFEST_NAME).read_text())
    assert manifest["checkpoint_id"] in shown and "2 file(s), saved by 2 process(es)" in shown
    assert "0.weight  exp_avg     7x5" in shown.replace("exp_avg_sq", "") or "7x5" in shown
    out = str(tmp_path / "consolidated")
    done = subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "consolidate", ckpt, out], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "optimizer.safetensors" in done.stdout and "scheduler.json" in done.stdout
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    weights = _params_of(at_save)
    model, opt, sched = _make(1, weights)
    hf_optim.load_state(out, opt, sched, model=model)
    for key, value in _snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key
