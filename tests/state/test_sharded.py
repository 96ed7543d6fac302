"""Sharded (FSDP2) optimizer state: save on N processes, resume on N, M or one plain process.

Every multi-process run is compared with a reference run of the same global batch: the uninterrupted run on the
same number of processes for bit-exact continuation, and the loaded state against the saved state (gathered with
``full_tensor`` in the saving run) for exact restoration on another number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state import load_state
from hf_optim.state.sharded import (
    SHARDED_MANIFEST_NAME,
    inspect_sharded_state,
    save_sharded_state,
)
from tests.state.sharded_jobs import (
    STEPS_AFTER,
    STEPS_BEFORE,
    accumulated,
    make_run,
    params_of,
    run_snapshot,
    spawn_dying,
    spawn_job,
    train,
    train_accumulating,
    weights_from,
)


@pytest.fixture
def saved(sharded_saves, tmp_path):
    """A copy of the session's two-process sharded saves (tests/conftest.py), for this test to write beside."""
    return str(shutil.copytree(sharded_saves, tmp_path / "saves"))


@pytest.fixture(scope="module")
def saved3(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded3"))
    spawn_job(3, "save", out)
    return out


def _plain_resume(out: str) -> tuple[dict, dict]:
    weights = weights_from(os.path.join(out, "at_save.safetensors"))
    model, opt, sched = make_run(1, weights)
    load_state(os.path.join(out, "ckpt"), opt, sched, model=model)
    loaded = run_snapshot(model, opt)
    train(model, opt, sched, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), 0, 1)
    return loaded, run_snapshot(model, opt)


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
    spawn_job(world, "resume", saved)
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
    spawn_job(2, "resume", saved3)
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


@pytest.mark.parametrize("world", [1, 2])
def test_accumulator_saved_mid_window_resumes(saved, world):
    out = saved
    if world == 1:
        _worker_plain_accumulating(out)
    else:
        spawn_job(world, "acc-resume", out)
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


def test_consolidated_checkpoint_keeps_the_accumulator(saved, tmp_path):
    from hf_optim.state import consolidate_state

    written = consolidate_state(os.path.join(saved, "acc"), tmp_path / "v1")
    assert any(p.endswith("accumulator.safetensors") for p in written)
    at_save = load_file(os.path.join(saved, "acc_at_save.safetensors"))
    weights = params_of(at_save)
    model, opt, sched = make_run(1, weights)
    acc = hf_optim.GradientAccumulator()
    report = hf_optim.load_state(tmp_path / "v1", opt, sched, acc, model=model)
    assert report.complete and report.accumulator_loaded and acc.step == 1
    loaded = {**run_snapshot(model, opt), **accumulated(acc)}
    assert loaded.keys() == at_save.keys()
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key


def _worker_plain_accumulating(out: str) -> None:
    weights = weights_from(os.path.join(out, "acc_at_save.safetensors"))
    model, opt, sched = make_run(1, weights)
    acc = hf_optim.GradientAccumulator()
    hf_optim.load_state(os.path.join(out, "acc"), opt, sched, acc, model=model)
    loaded = {**run_snapshot(model, opt), **accumulated(acc)}
    train_accumulating(model, opt, sched, acc, range(2 * STEPS_BEFORE + 1, 2 * STEPS_BEFORE + 6), 0, 1)
    save_file(loaded, os.path.join(out, "acc_loaded_1.safetensors"))
    save_file(run_snapshot(model, opt), os.path.join(out, "acc_resumed_1.safetensors"))


def test_accumulator_mismatch_changes_nothing(saved):
    weights = weights_from(os.path.join(saved, "acc_at_save.safetensors"))
    model, opt, sched = make_run(1, weights)
    acc = hf_optim.GradientAccumulator()
    acc([torch.zeros(3)])  # one gradient accumulated: the checkpoint has four
    with pytest.raises(CheckpointError, match="has 4 gradients, the accumulator 1"):
        hf_optim.load_state(os.path.join(saved, "acc"), opt, sched, acc, model=model)
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
    model, opt, sched = make_run(1, weights)
    before_sched = dict(sched.__dict__)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_state(bad, opt, sched, model=model)
    assert bad in str(info.value) or "bad" in str(info.value)
    assert not opt.state and sched.__dict__.keys() == before_sched.keys()
    assert all(sched.__dict__[k] == v for k, v in before_sched.items() if k != "optimizer")


def test_every_rank_raises_and_stays_unchanged(saved):
    _corrupt_copy(saved, "missing", ATTACKS["missing shard"][0])
    spawn_job(2, "corrupt", saved)
    for rank in range(2):
        result = json.loads(Path(os.path.join(saved, f"corrupt_{rank}.json")).read_text())
        assert "is missing" in result["message"] and result["unchanged"], result


@pytest.mark.parametrize("job", ["kill-write", "kill-manifest"])
def test_save_killed_on_one_rank_keeps_the_previous_checkpoint(saved, tmp_path, job):
    shutil.copytree(os.path.join(saved, "ckpt"), tmp_path / "ckpt")
    shutil.copy(os.path.join(saved, "at_save.safetensors"), tmp_path / "at_save.safetensors")
    spawn_dying(2, job, str(tmp_path))
    loaded, _ = _plain_resume(str(tmp_path))  # the previous checkpoint, whole
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    leftovers = [
        e for e in os.listdir(tmp_path / "ckpt") if e.endswith(".tmp") or e.startswith("optimizer-shards-")
    ]
    assert len(leftovers) >= 2  # the killed save's folder is still there, unreferenced...
    model, opt, sched = make_run(1, None)
    train(model, opt, sched, range(1), 0, 1)
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
    weights = params_of(at_save)
    model, opt, sched = make_run(1, weights)
    hf_optim.load_state(os.path.join(saved, "v1"), opt, sched, model=model)
    for key, value in run_snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key
    # and two FSDP2 processes each take their shard of it (1 -> 2), continuing bit for bit
    spawn_job(2, "resume-v1", saved)
    loaded = load_file(os.path.join(saved, "loaded_v1_2.safetensors"))
    for key, value in at_save.items():
        assert torch.equal(loaded[key], value), key
    final = load_file(os.path.join(saved, "final_2.safetensors"))
    resumed = load_file(os.path.join(saved, "resumed_v1_2.safetensors"))
    for key, value in final.items():
        assert torch.equal(resumed[key], value), key


def test_public_save_and_load_state_choose_the_sharded_format(saved):
    spawn_job(2, "public", saved)
    result = json.loads(Path(os.path.join(saved, "public.json")).read_text())
    assert result == {"same": True, "complete": True, "loaded": 4}
    assert os.path.isfile(os.path.join(saved, "public", SHARDED_MANIFEST_NAME))


def test_model_is_required_for_sharded_state(saved):
    _, opt, sched = make_run(1, None)
    with pytest.raises(ValueError, match="model="):
        hf_optim.load_state(os.path.join(saved, "ckpt"), opt, sched)


def test_push_from_every_process_and_resume_from_the_hub(saved, hub_repo_id, hub_api, tmp_path):
    out = str(tmp_path)
    spawn_job(2, f"hub:{hub_repo_id}", out)
    commits = hub_api.list_repo_commits(hub_repo_id)
    assert next(c.commit_id for c in commits) == Path(out, "hub_commit.txt").read_text()
    files = hub_api.list_repo_files(hub_repo_id)
    shards = [f for f in files if f.startswith("step-3/optimizer-shards-")]
    assert "step-3/optimizer.sharded.json" in files and len(shards) == 2
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".metadata")) or "/." in f]
    spawn_job(3, f"hub:{hub_repo_id}", out)
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
    spawn_job(2, f"machines:hf://{hub_repo_id}/run", str(tmp_path))
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
    # step, schedule and groups as the single-process inspection of the consolidated state shows them, and the
    # learning rate as the linear schedule's formula gives it (warmup 2, 20 steps, lr 1e-2)
    sharded, single = inspect_sharded_state(ckpt), hf_optim.state.inspect_state(out)
    assert sharded.step is not None and sharded.step == single.step
    assert [g["hyperparameters"] for g in sharded.param_groups] == [
        g["hyperparameters"] for g in single.param_groups
    ]
    assert [g["num_params"] for g in sharded.param_groups] == [g["num_params"] for g in single.param_groups]
    assert (sharded.scheduler_name, sharded.scheduler_step) == ("linear", single.scheduler_step)
    assert sharded.scheduler_lr == pytest.approx([1e-2 * (20 - sharded.scheduler_step) / 18])
    step_line = next(line for line in shown.splitlines() if line.startswith("Step"))
    assert step_line.split()[-1] != "-" and "linear" in shown and "group 0" in shown
    at_save = load_file(os.path.join(saved, "at_save.safetensors"))
    weights = params_of(at_save)
    model, opt, sched = make_run(1, weights)
    hf_optim.load_state(out, opt, sched, model=model)
    for key, value in run_snapshot(model, opt).items():
        assert torch.equal(value, at_save[key]), key
