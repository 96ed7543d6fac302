"""Streaming consolidation of sharded (FSDP2) optimizer state into the ordinary single-process checkpoint.

References: the state gathered with ``full_tensor`` in the saving run (read back with the safetensors library),
and the checkpoint ``save_state_dict`` writes from that gathered state in memory (the path consolidation took
before it streamed): same files, same JSON, same tensor layout and bytes; only the checkpoint ids differ.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state import OPTIMIZER_INDEX_NAME, consolidate_state
from hf_optim.state.format import qualname
from hf_optim.state.sharded import (
    SHARDED_MANIFEST_NAME,
    ConsolidationSource,
    open_consolidation,
    save_sharded_state,
)
from tests.multiprocess import free_port, run_workers

FILE_SIZE = 300  # bytes per shard file of each process: several files per process
OUT_SHARD_SIZE = 700  # bytes per consolidated file: several files


class _Net(torch.nn.Module):
    """Tensors of several shapes, one split unevenly over 2 processes (7 rows), one in bfloat16 whose single
    row leaves one process an empty chunk."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(12, 10)
        self.b = torch.nn.Linear(10, 7)
        self.c = torch.nn.Linear(7, 1).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(h.bfloat16()).float()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _Net()
        for layer in (model.a, model.b, model.c):
            fully_shard(layer)
        fully_shard(model)
        opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
        for step in range(3):
            x = torch.randn(4, 12, generator=torch.Generator().manual_seed(100 * step + rank))
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        save_sharded_state(os.path.join(out, "ckpt"), opt, sched, model=model, max_shard_size=FILE_SIZE)
        names = {id(p): n for n, p in model.named_parameters()}
        full_sd = opt.state_dict()  # collectives below: every rank
        full_sd["state"] = {
            i: {k: _full(v) if torch.is_tensor(v) else v for k, v in entries.items()}
            for i, entries in full_sd["state"].items()
        }
        for sd_group, group in zip(full_sd["param_groups"], opt.param_groups, strict=True):
            sd_group["param_names"] = [names[id(p)] for p in group["params"]]
        gathered = {
            f"state.{names[id(p)]}.{k}": _full(v)
            for p, entries in opt.state.items()
            for k, v in entries.items()
            if torch.is_tensor(v) and v.dim()
        }
        if rank == 0:
            save_file(gathered, os.path.join(out, "gathered.safetensors"))
            config = sched.hf_optim_config
            hf_optim.save_state_dict(  # the in-memory path, from the live state
                os.path.join(out, "reference"),
                full_sd,
                param_shapes=[[list(p.shape) for p in g["params"]] for g in opt.param_groups],
                optimizer_class=qualname(opt),
                scheduler_state=sched.state_dict(),
                scheduler_class=qualname(sched),
                scheduler_name=config["name"],
                scheduler_kwargs=config["kwargs"],
                max_shard_size=OUT_SHARD_SIZE,
            )
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("consolidate"))
    run_workers(_worker, (2, free_port(), out), 2)
    return out


def _header(path: str) -> tuple[dict, bytes]:
    """A safetensors file's JSON header (entries in file order) and its data bytes, read by hand."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _without_id(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "checkpoint_id"}


def test_the_fixture_has_several_shard_files_and_an_empty_chunk(saved):
    ckpt = os.path.join(saved, "ckpt")
    manifest = json.loads(Path(ckpt, SHARDED_MANIFEST_NAME).read_text())
    files = manifest["shards"]["files"]
    assert len([f for f in files if f.startswith("shard-00001-")]) >= 3
    assert len([f for f in files if f.startswith("shard-00002-")]) >= 3
    with open_consolidation(ckpt) as source:
        sizes = {key: [c.sizes for c in plan.chunks] for key, plan in source.manifest.tensors.items()}
    assert sizes["state.b.weight.exp_avg"] == [(4, 10), (3, 10)]
    recorded = manifest["state"]["c.weight"]["exp_avg"]["chunks"]
    assert sorted(c["sizes"] for c in recorded) == [[0, 7], [1, 7]]  # one process's shard is empty...
    assert sizes["state.c.weight.exp_avg"] == [(1, 7)]  # ...and holds no data to read


def test_streamed_checkpoint_is_the_in_memory_one(saved, tmp_path):
    out = str(tmp_path / "out")
    written = consolidate_state(os.path.join(saved, "ckpt"), out, max_shard_size=OUT_SHARD_SIZE)
    reference = os.path.join(saved, "reference")
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(reference))
    assert sorted(os.path.basename(p) for p in written) == names
    assert OPTIMIZER_INDEX_NAME in names and len([n for n in names if n.startswith("optimizer-0")]) >= 3
    ids = set()
    for name in names:
        if name.endswith(".json"):
            ours, theirs = (
                json.loads(Path(out, name).read_text()),
                json.loads(Path(reference, name).read_text()),
            )
            if name == OPTIMIZER_INDEX_NAME:
                ids.add(ours["metadata"]["hf_optim"]["checkpoint_id"])
                ours["metadata"]["hf_optim"].pop("checkpoint_id")
                theirs["metadata"]["hf_optim"].pop("checkpoint_id")
            else:
                ids.add(ours["checkpoint_id"])
                ours, theirs = _without_id(ours), _without_id(theirs)
            assert ours == theirs, name
            continue
        (ours, ours_data), (theirs, theirs_data) = (
            _header(os.path.join(out, name)),
            _header(os.path.join(reference, name)),
        )
        ours_meta, theirs_meta = ours.pop("__metadata__"), theirs.pop("__metadata__")
        assert list(ours.items()) == list(theirs.items()), name  # same tensors, order, offsets
        assert ours_data == theirs_data, name  # same bytes
        ids.add(json.loads(ours_meta["hf_optim"])["checkpoint_id"])
        assert ours_meta.keys() == theirs_meta.keys() and ours_meta["format"] == theirs_meta["format"]
        assert _without_id(json.loads(ours_meta["hf_optim"])) == _without_id(
            json.loads(theirs_meta["hf_optim"])
        )
    assert len(ids) == 1  # one checkpoint


def test_consolidated_tensors_are_the_gathered_state(saved, tmp_path):
    out = tmp_path / "out"
    consolidate_state(os.path.join(saved, "ckpt"), out, max_shard_size=OUT_SHARD_SIZE)
    files = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            files.update(load_file(out / name))
    gathered = load_file(os.path.join(saved, "gathered.safetensors"))
    assert gathered.keys() <= files.keys()
    for key, value in gathered.items():
        assert files[key].dtype == value.dtype and torch.equal(files[key], value), key
    assert files["state.c.weight.exp_avg"].dtype == torch.bfloat16


def test_one_full_tensor_is_alive_at_a_time(saved, tmp_path, monkeypatch):
    built, alive, most = [], [0], [0]
    original = ConsolidationSource.full_tensor

    def counting(self, index, state_key):
        tensor = original(self, index, state_key)
        built.append((index, state_key))
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(ConsolidationSource, "full_tensor", counting)
    consolidate_state(os.path.join(saved, "ckpt"), tmp_path / "out", max_shard_size="1GB")
    assert len(built) == len(set(built)) == 12  # 6 parameters x (exp_avg, exp_avg_sq), each built once
    assert most[0] == 1 and alive[0] == 0


@pytest.mark.parametrize("buffer", [1, 40, 10**9])
def test_tensors_are_assembled_through_any_read_buffer(saved, buffer):
    gathered = load_file(os.path.join(saved, "gathered.safetensors"))
    with open_consolidation(os.path.join(saved, "ckpt"), read_buffer_size=buffer) as source:
        assert len(source.plans) == len(gathered)
        for (index, state_key), plan in source.plans.items():
            assert source.state_dict["state"][index][state_key].is_meta
            assert torch.equal(source.full_tensor(index, state_key), gathered[plan.key]), plan.key


def test_a_failure_mid_stream_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    out = tmp_path / "out"
    consolidate_state(os.path.join(saved, "ckpt"), out, max_shard_size=OUT_SHARD_SIZE)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    original, calls = ConsolidationSource.full_tensor, [0]

    def failing(self, index, state_key):
        calls[0] += 1
        if calls[0] == 5:
            raise CheckpointError("shard unreadable")
        return original(self, index, state_key)

    monkeypatch.setattr(ConsolidationSource, "full_tensor", failing)
    with pytest.raises(CheckpointError, match="shard unreadable"):
        consolidate_state(os.path.join(saved, "ckpt"), out, max_shard_size=OUT_SHARD_SIZE)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def _edited(saved: str, tmp_path: Path, edit) -> str:
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(saved, "ckpt"), bad)
    path = Path(bad, SHARDED_MANIFEST_NAME)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["param_groups"][0]["params"].append("a.weight"), "listed twice"),
        (lambda d: d["param_groups"][0]["params"].remove("b.bias"), "in no param group"),
        (lambda d: d["state"]["a.weight"]["exp_avg"].update(shape=[10, 13]), "a.weight"),
    ],
)
def test_incoherent_manifests_are_refused_before_writing(saved, tmp_path, edit, match):
    bad = _edited(saved, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        consolidate_state(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
