"""Hostile sharded checkpoints: lying chunk and accumulator records, odd file names, mixed saves, and
hostile input that one process meets while the others wait in a collective.

Every hostile file must give a ``CheckpointError`` (on every process: all raise together, none waits forever)
and leave the live objects unchanged. References: the state saved by the two-process run (``at_save``), the
live objects' own values before the load.
"""

from __future__ import annotations

import json
import os
import re
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
from tests.state.helpers import assert_live_unchanged, live_snapshot
from tests.state.sharded_jobs import make_run, weights_from

TIMEOUT = 60  # seconds a multi-process test may take before it counts as a hang (2 busy cores)


@pytest.fixture
def saved(sharded_saves):
    """The session's two-process sharded saves (tests/conftest.py)."""
    return sharded_saves


def _weights(saved: str, name: str) -> dict[str, torch.Tensor]:
    return weights_from(os.path.join(saved, name))


def _copy(saved: str, dest: str, name: str, edit=None) -> str:
    shutil.copytree(os.path.join(saved, name), dest)
    if edit is not None:
        path = os.path.join(dest, SHARDED_MANIFEST_NAME)
        doc = json.loads(Path(path).read_text())
        edit(doc)
        Path(path).write_text(json.dumps(doc))
    return dest


def _shard_dir(folder: str) -> str:
    doc = json.loads(Path(folder, SHARDED_MANIFEST_NAME).read_text())
    return os.path.join(folder, doc["shards"]["folder"])


def _huge_state_shape(doc):
    entry = doc["state"]["0.bias"]["exp_avg"]
    entry["shape"] = [2**70]
    entry["chunks"] = [{"file": entry["chunks"][0]["file"], "offsets": [0], "sizes": [2**70]}]


def _huge_gradient_shape(doc):
    entry = doc["accumulator"]["gradients"][1]
    entry["shape"] = [2**70]
    entry["chunks"] = [{"file": entry["chunks"][0]["file"], "offsets": [0], "sizes": [2**70]}]


def _gradient_parameter(name):
    def edit(doc):
        doc["accumulator"]["gradients"][1]["parameter"] = name

    return edit


# Loaded WITHOUT an accumulator (optimizer and scheduler only): the accumulator record is still read.
NO_ACCUMULATOR_ATTACKS = {
    "gradient placed like a parameter the model does not have": (_gradient_parameter("nope"), "nope"),
    "gradient placed like a parameter of another shape": (_gradient_parameter("2.bias"), "2.bias|shape"),
    "gradient of a huge global shape": (_huge_gradient_shape, "shape|gradient"),
    "state tensor of a huge global shape": (_huge_state_shape, "0.bias|shape"),
}


def _acc_edit(fn):
    def edit(doc):
        fn(doc["accumulator"])

    return edit


ACCUMULATOR_ATTACKS = {
    "class spoofed": (_acc_edit(lambda a: a.update({"class": "builtins.object"})), "saved from"),
    "gradients inside state": (_acc_edit(lambda a: a["state"]["dict"].update(gradients=[])), "gradients"),
    "tensor inside state": (
        _acc_edit(lambda a: a["state"]["dict"].update(step={"tensor": "x"})),
        "accumulator",
    ),
    "extra counter": (_acc_edit(lambda a: a["state"]["dict"].update(extra=1)), "extra"),
    "bool counter": (_acc_edit(lambda a: a["state"]["dict"].update(step=True)), "step"),
    "integer gradient": (_acc_edit(lambda a: a["gradients"][0].update(dtype="int64")), "int64"),
    "gradient points at a state tensor": (
        _acc_edit(lambda a: a["gradients"][0].update(sharded="state.0.weight.exp_avg")),
        "points at tensor",
    ),
    "gradient placed like a missing parameter": (_gradient_parameter("nope"), "nope"),
    "gradient placed like another-shaped parameter": (_gradient_parameter("2.bias"), "global shape"),
    "gradients dropped, tensors still in the shards": (
        _acc_edit(lambda a: a.update(gradients=[None] * len(a["gradients"]))),
        "not in the manifest",
    ),
    "not an object": (lambda d: d.update(accumulator=[1]), "accumulator"),
    "counter refused by the accumulator": (_acc_edit(lambda a: a["state"]["dict"].update(step=-1)), "step"),
}


def _append_file(name):
    def edit(doc):
        doc["shards"]["files"].append(name)

    return edit


CHUNK_ATTACKS = {
    "offsets of the wrong dimension": (
        lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"][1].update(offsets=[4]),
        "outside",
    ),
    "negative size": (
        lambda d: d["state"]["0.weight"]["exp_avg"]["chunks"][1].update(sizes=[-3, 5]),
        "negative",
    ),
    "boolean offsets": (
        lambda d: d["state"]["0.bias"]["exp_avg"]["chunks"][0].update(offsets=[False]),
        "integers",
    ),
    "extra field in a chunk": (
        lambda d: d["state"]["0.bias"]["exp_avg"]["chunks"][0].update(path="/etc/passwd"),
        "chunk must name",
    ),
    "two chunks, one file, tiling kept": (
        lambda d: d["state"]["0.bias"]["exp_avg"].update(
            chunks=[
                {"file": d["shards"]["files"][0], "offsets": [0], "sizes": [4]},
                {"file": d["shards"]["files"][0], "offsets": [4], "sizes": [3]},
            ]
        ),
        "two chunks recorded in",
    ),
    "listed file name with a trailing newline": (
        lambda d: _append_file(d["shards"]["files"][0] + "\n")(d),
        "shards.files",
    ),
    "listed file name with non-ASCII digits": (
        _append_file("shard-\u0661\u0661\u0661\u0661\u0661-model-00001-of-00001.safetensors"),
        "shards.files",
    ),
}


# One table: (which save, manifest edit, expected message, loaded with a live accumulator)
RECORD_ATTACKS = {
    **{f"{k} (no accumulator loaded)": ("acc", *v, False) for k, v in NO_ACCUMULATOR_ATTACKS.items()},
    **{k: ("acc", *v, True) for k, v in ACCUMULATOR_ATTACKS.items()},
    **{k: ("ckpt", *v, False) for k, v in CHUNK_ATTACKS.items()},
}


@pytest.mark.parametrize("attack", sorted(RECORD_ATTACKS))
def test_hostile_record_is_refused_and_changes_nothing(saved, tmp_path, attack):
    which, edit, expected, with_accumulator = RECORD_ATTACKS[attack]
    bad = _copy(saved, str(tmp_path / "bad"), which, edit)
    at_save = "acc_at_save.safetensors" if which == "acc" else "at_save.safetensors"
    model, opt, sched = make_run(1, _weights(saved, at_save))
    acc = None
    if with_accumulator:  # mid-window, with gradients of its own
        acc = hf_optim.GradientAccumulator()
        acc([torch.ones(7, 5), torch.ones(7), torch.ones(3, 7), torch.ones(3)])
    before = live_snapshot(model, opt, sched, acc)
    with pytest.raises(CheckpointError, match=expected):
        hf_optim.load_state(bad, opt, sched, acc, model=model)
    assert_live_unchanged(before, model, opt, sched, acc)


def test_shard_file_of_another_save_is_refused(saved, tmp_path):
    """A shard file another save wrote (same layout, other values) in this checkpoint's folder must not be read
    as part of it: each shard file's metadata names the save that wrote it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = _copy(saved, str(tmp_path / "first"), "ckpt")
    path = os.path.join(_shard_dir(first), sorted(os.listdir(_shard_dir(first)))[1])
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) + 1 for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    assert metadata["hf_optim_checkpoint_id"] in Path(first, SHARDED_MANIFEST_NAME).read_text()
    save_file(tensors, path, metadata={**metadata, "hf_optim_checkpoint_id": "0" * 32})  # another save's file
    model, opt, sched = make_run(1, _weights(saved, "at_save.safetensors"))
    with pytest.raises(CheckpointError, match="written by another save"):
        load_state(first, opt, sched, model=model)
    assert not opt.state


# ---------------------------------------------------------------------------------------------------------------
# One process meets hostile input, the others wait: all must raise together, none may hang
# ---------------------------------------------------------------------------------------------------------------


def _local(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _rank_worker(rank: int, world: int, port: int, out: str, with_accumulator: bool) -> None:
    """Rank r loads from its own copy ``out/rank<r>`` (node-local storage, or machines that downloaded the
    repository at different times): the copies differ in what the test put there."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT - 12))
    result: dict = {}
    try:
        model, opt, sched = make_run(world, _weights(out, "weights.safetensors"))
        acc = hf_optim.GradientAccumulator() if with_accumulator else None
        before = _local(model)
        try:
            hf_optim.load_state(os.path.join(out, f"rank{rank}"), opt, sched, acc, model=model)
            result["outcome"] = "loaded"
        except Exception as exc:
            result["outcome"] = type(exc).__name__
            result["message"] = str(exc)[:400]
            # this process's own parameter shards only: a collective here could meet another rank's pending one
            result["unchanged"] = not opt.state and all(
                torch.equal(before[k], v) for k, v in _local(model).items()
            )
    finally:
        report_and_wait(out, "rank", rank, world, result, TIMEOUT)
        dist.destroy_process_group()


def _run_ranks(world: int, out: str, with_accumulator: bool) -> list[dict]:
    return run_with_deadline(_rank_worker, world, (out, with_accumulator), out, "rank", TIMEOUT)


RANK_ATTACKS = {
    # rank 1's copy has a record whose error is not a CheckpointError; rank 0's copy is intact
    "huge global shape": ("acc", _huge_state_shape, True),
    "gradient placed like a missing parameter, no accumulator": ("acc", _gradient_parameter("nope"), False),
    "gradient placed like another-shaped parameter, no accumulator": (
        "acc",
        _gradient_parameter("2.bias"),
        False,
    ),
    # a CheckpointError on one rank only (its copy lacks the file it reads): the agreed path, for reference
    "missing shard on one rank": (
        "ckpt",
        lambda d: None,
        False,
    ),
}


@pytest.mark.parametrize("attack", sorted(RANK_ATTACKS))
def test_hostile_copy_on_one_rank_raises_on_every_rank(saved, tmp_path, attack):
    name, edit, with_accumulator = RANK_ATTACKS[attack]
    out = str(tmp_path)
    weights = "acc_at_save.safetensors" if name == "acc" else "at_save.safetensors"
    shutil.copy(os.path.join(saved, weights), os.path.join(out, "weights.safetensors"))
    _copy(saved, os.path.join(out, "rank0"), name)
    bad = _copy(saved, os.path.join(out, "rank1"), name, edit)
    if attack == "missing shard on one rank":
        os.remove(os.path.join(_shard_dir(bad), sorted(os.listdir(_shard_dir(bad)))[1]))
    results = _run_ranks(2, out, with_accumulator)
    for rank, result in enumerate(results):
        assert result.get("outcome") == "CheckpointError", (rank, results)
        assert result.get("unchanged"), (rank, results)


@pytest.mark.parametrize("size", [0, 1])
def test_many_chunks_in_a_small_manifest_end_quickly(saved, tmp_path, size):
    """20,000 chunk records (a 2 MB manifest) must not keep a process busy: empty ones hold no data and are
    dropped (the load goes on, exactly), non-empty ones in one file are refused (a file holds a tensor once)."""
    import subprocess
    import sys

    def many(doc):
        chunks = doc["state"]["0.bias"]["exp_avg"]["chunks"]
        chunks += [{"file": chunks[0]["file"], "offsets": [i % 7], "sizes": [size]} for i in range(20_000)]

    bad = _copy(saved, str(tmp_path / "bad"), "ckpt", many)
    code = (
        "import sys\n"
        "from hf_optim.errors import CheckpointError\n"
        "from hf_optim.state import load_state\n"
        "from tests.state.sharded_jobs import make_run\n"
        "model, opt, sched = make_run(1, None)\n"
        "try:\n"
        "    load_state(sys.argv[1], opt, sched, model=model)\n"
        "    print('loaded')\n"
        "except CheckpointError as exc:\n"
        "    print('refused:', str(exc)[:200])\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, bad], capture_output=True, text=True, timeout=60, env=env, cwd=root
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a 2 MB manifest of chunk records kept the load busy for more than 20 s")
    expected = "loaded" if size == 0 else "refused: .*two chunks recorded in"
    assert re.search(expected, done.stdout), done.stdout + done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Errors that torch.distributed.checkpoint raises on every rank: hf_optim's own, catchable types
# ---------------------------------------------------------------------------------------------------------------


def _shadow_chunk(folder: str) -> None:
    """``state.0.bias.exp_avg`` whole in shard 1 at [0], plus a zero-size chunk at [0] in shard 2: both headers
    hold exactly what the manifest records, the tiling holds (zero-size chunks cover and overlap nothing), but DCP
    indexes storage by (tensor, offsets): every read of the real chunk goes to shard 2's empty tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = "state.0.bias.exp_avg"
    names = json.loads(Path(folder, SHARDED_MANIFEST_NAME).read_text())["shards"]["files"]
    paths = [os.path.join(_shard_dir(folder), n) for n in names]
    contents = []
    for path in paths:
        with safe_open(path, "pt") as f:
            contents.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))  # noqa: SIM118
    full = torch.cat([contents[0][0][key], contents[1][0][key]])
    for i, (tensors, metadata) in enumerate(contents):
        info = json.loads(metadata["DCP_SHARDING_INFO"])
        tensors[key] = full if i == 0 else full[:0]
        info[key] = {"saved_offsets": [0]}
        save_file(tensors, paths[i], metadata={**metadata, "DCP_SHARDING_INFO": json.dumps(info)})

    def edit(doc):
        doc["state"]["0.bias"]["exp_avg"]["chunks"] = [
            {"file": names[0], "offsets": [0], "sizes": [7]},
            {"file": names[1], "offsets": [0], "sizes": [0]},
        ]

    path = os.path.join(folder, SHARDED_MANIFEST_NAME)
    doc = json.loads(Path(path).read_text())
    edit(doc)
    Path(path).write_text(json.dumps(doc))


def test_zero_size_chunk_at_a_real_chunks_offsets_holds_no_data(saved, tmp_path):
    """DCP indexes storage by (tensor, offsets): an empty chunk at a real chunk's offsets would take its place in
    the read plan. Empty chunks hold no data and are left out of the plan, so the real one is read, exactly."""
    bad = _copy(saved, str(tmp_path / "bad"), "ckpt")
    _shadow_chunk(bad)
    model, opt, sched = make_run(1, _weights(saved, "at_save.safetensors"))
    load_state(bad, opt, sched, model=model)
    reference = load_file(os.path.join(saved, "at_save.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    for p, entries in opt.state.items():
        for key, value in entries.items():
            if value.dim():
                assert torch.equal(value.reshape(-1), reference[f"state.{names[id(p)]}.{key}"]), key


def _job_worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT - 12))
    result: dict = {}
    try:
        if job == "shadow":
            model, opt, sched = make_run(world, _weights(out, "weights.safetensors"))
            before = _local(model)
            action = lambda: hf_optim.load_state(os.path.join(out, "bad"), opt, sched, model=model)  # noqa: E731
        else:  # "uneven-window": rank 1 skipped its micro-batch's accumulation (an uneven last batch)
            from tests.state.sharded_jobs import batch

            model, opt, sched = make_run(world, None)
            acc = hf_optim.GradientAccumulator()
            model(batch(0, rank, world)).pow(2).mean().backward()
            if rank == 0:
                acc.accumulate_from(model)
            before = _local(model)
            action = lambda: hf_optim.save_state(os.path.join(out, "save"), opt, sched, acc, model=model)  # noqa: E731
        try:
            action()
            result["outcome"] = "done"
        except BaseException as exc:
            result["outcome"] = type(exc).__name__
            result["is_exception"] = isinstance(exc, Exception)
            result["message"] = str(exc)[:300]
            result["unchanged"] = not opt.state and all(
                torch.equal(before[k], v) for k, v in _local(model).items()
            )
    finally:
        report_and_wait(out, "rank", rank, world, result, TIMEOUT)
        dist.destroy_process_group()


def _run_job(world: int, out: str, job: str) -> list[dict]:
    return run_with_deadline(_job_worker, world, (out, job), out, "rank", TIMEOUT)


def test_zero_size_chunk_at_a_real_chunks_offsets_on_two_processes(saved, tmp_path):
    out = str(tmp_path)
    shutil.copy(os.path.join(saved, "at_save.safetensors"), os.path.join(out, "weights.safetensors"))
    _shadow_chunk(_copy(saved, os.path.join(out, "bad"), "ckpt"))
    results = _run_job(2, out, "shadow")
    assert [r.get("outcome") for r in results] == ["done", "done"], results


def test_save_with_uneven_accumulation_windows_raises_a_catchable_error(tmp_path):
    """One process accumulated a micro-batch, the other did not: the processes' accumulators disagree. The save
    must fail on every process with an ordinary exception (hf_optim reports save failures as ``OSError``), not
    torch's ``CheckpointException`` (a ``BaseException`` that ``except Exception`` lets through)."""
    results = _run_job(2, str(tmp_path), "uneven-window")
    for rank, result in enumerate(results):
        assert result.get("outcome") != "done" and result.get("is_exception"), (rank, results)


def test_ranks_loading_different_saves_raise_on_every_rank(saved, tmp_path):
    """Rank 0's folder holds one save, rank 1's folder (same path on another machine) another save of the same
    model: each check passes on its own, but the ranks would restore a mix of two trainings (rank 0's shards
    from one, rank 1's from the other, each its own scheduler position). The ranks must agree on the checkpoint
    id and all raise."""
    out = str(tmp_path)
    shutil.copy(os.path.join(saved, "at_save.safetensors"), os.path.join(out, "weights.safetensors"))
    _copy(saved, os.path.join(out, "rank0"), "ckpt")
    _copy(saved, os.path.join(out, "rank1"), "acc")
    ids = {
        json.loads(Path(out, f"rank{r}", SHARDED_MANIFEST_NAME).read_text())["checkpoint_id"] for r in (0, 1)
    }
    assert len(ids) == 2  # really two saves
    results = _run_ranks(2, out, False)
    for rank, result in enumerate(results):
        assert result.get("outcome") == "CheckpointError", (rank, results)
        assert result.get("unchanged"), (rank, results)


def _surrogate_name(doc):
    """A parameter name holding a lone surrogate (``"\\ud800"`` in the JSON: valid JSON, a str Python cannot
    encode to UTF-8): the error naming the tensor ``state.<name>.<key>`` carries it."""
    record = doc["state"]["0.bias\ud800"] = doc["state"].pop("0.bias")
    for state_key, entry in record.items():
        if "sharded" in entry:
            entry["sharded"] = f"state.0.bias\ud800.{state_key}"


def test_error_message_that_is_not_utf8_is_agreed_on_every_rank(saved, tmp_path):
    """Rank 1's copy names a parameter with a lone surrogate: rank 1 refuses it, and every rank must hear of it
    (a CheckpointError on both) rather than rank 1 failing to encode its message for the others, alone, while
    rank 0 waits for it in the collective."""
    out = str(tmp_path)
    shutil.copy(os.path.join(saved, "at_save.safetensors"), os.path.join(out, "weights.safetensors"))
    _copy(saved, os.path.join(out, "rank0"), "ckpt")
    _copy(saved, os.path.join(out, "rank1"), "ckpt", _surrogate_name)
    assert "\\ud800" in Path(out, "rank1", SHARDED_MANIFEST_NAME).read_text()  # the JSON escape, valid JSON
    results = _run_ranks(2, out, False)
    for rank, result in enumerate(results):
        assert result.get("outcome") == "CheckpointError", (rank, results)
        assert result.get("unchanged"), (rank, results)
