"""Loading into FSDP2 reads, on every process, only the byte ranges of its own part of the state tensors.

Both loading paths into ``DTensor`` parameters are measured: an ordinary checkpoint (format version 1) loaded on 2
and 3 processes, and a sharded checkpoint saved on 2 processes loaded on 2 and 3 (resharding). Each process
counts the bytes it read during the load with Linux's ``/proc/self/io`` ``rchar`` (every ``read`` / ``pread``,
page-cache hits included); a control read of the whole checkpoint shows that the counter sees those reads. The
loaded parts are compared with the saved full tensors sliced like ``torch.chunk`` (FSDP2's row split) and with
``distribute_tensor`` of them (what the previous whole-tensor path kept).
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state.io import open_file, read_region, read_safetensors
from hf_optim.state.sharded import save_sharded_state
from tests.multiprocess import free_port, run_workers

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/io"),
    reason="the bytes a process read are counted by Linux's /proc/self/io",
)

# 1001 and 7 rows: uneven over 2 and over 3 processes (501/500, 334/334/333, 4/3, 3/3/1)
WIDTH, HIDDEN, OUT = 512, 1001, 7


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(1))
    per = 6 // world
    model(x[rank * per : (rank + 1) * per]).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _fsdp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _io() -> dict[str, int]:
    """This process's I/O counters: ``rchar`` (bytes read), ``syscr`` (read calls)..."""
    with open("/proc/self/io") as f:
        return {key: int(value) for key, value in (line.split(":") for line in f)}


def _rchar() -> int:
    return _io()["rchar"]


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every state tensor, whole (a collective for DTensor state)."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"{names[id(p)]}.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for p, entries in opt.state.items()
        for k, v in entries.items()
        if torch.is_tensor(v) and v.dim() > 0
    }


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _fsdp(_model())
        opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        if job == "save-v2":
            _step(model, opt, rank, world)
            save_sharded_state(os.path.join(out, "v2"), opt, model=model)
            full = _full_state(model, opt)
            if rank == 0:
                save_file(full, os.path.join(out, "v2_reference.safetensors"))
            return
        if job == "fail-v1":  # every check runs after the ranged reads, before anything is applied
            sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
            weights = {n: p.to_local().clone() for n, p in model.named_parameters()}
            groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            try:
                hf_optim.load_state(os.path.join(out, "v1"), opt, sched, model=model)
                error = None
            except ValueError as exc:  # the checkpoint has no scheduler state
                error = str(exc)
            unchanged = (
                not opt.state
                and groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                and all(torch.equal(weights[n], p.to_local()) for n, p in model.named_parameters())
                and sched.last_epoch == 0
            )
            with open(os.path.join(out, f"{job}_{rank}.json"), "w") as f:
                json.dump({"error": error, "unchanged": unchanged}, f)
            return
        source = "v1" if job == "load-v1" else "v2"
        reference = load_file(os.path.join(out, f"{source}_reference.safetensors"))
        load_state = hf_optim.load_state  # its modules imported before the bytes read are counted
        dist.barrier()
        before = _rchar()
        load_state(os.path.join(out, source), opt, model=model)
        read = _rchar() - before
        names = {id(p): n for n, p in model.named_parameters()}
        local, like_distribute = {}, {}
        for p, entries in opt.state.items():
            for k, v in entries.items():
                if isinstance(v, DTensor):
                    key = f"{names[id(p)]}.{k}"
                    local[key] = v.to_local().clone()
                    expected = distribute_tensor(
                        reference[key], p.device_mesh, p.placements, src_data_rank=None
                    )
                    like_distribute[key] = torch.equal(local[key], expected.to_local())
        save_file(local, os.path.join(out, f"{job}_{world}_{rank}.safetensors"))
        with open(os.path.join(out, f"{job}_{world}_{rank}.json"), "w") as f:
            json.dump({"read": read, "like_distribute": like_distribute}, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world: int, job: str, out: str) -> None:
    run_workers(_worker, (world, free_port(), job, out), world)


def _tensor_bytes(directory: str) -> int:
    """The bytes of every tensor in the checkpoint's safetensors files (what reading it whole costs)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".safetensors"):
                total += sum(
                    t.numel() * t.element_size() for t in load_file(os.path.join(root, name)).values()
                )
    return total


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ranges"))
    # format version 1, written by one plain process, in several files
    model = _model()
    opt = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    _step(model, opt, 0, 1)
    hf_optim.save_state(os.path.join(out, "v1"), opt, model=model, max_shard_size="1MB")
    save_file(_full_state(model, opt), os.path.join(out, "v1_reference.safetensors"))
    # format version 2, written by two FSDP2 processes
    _spawn(2, "save-v2", out)
    return out


def test_checkpoints_are_multi_megabyte_and_split(saved):
    assert len([f for f in os.listdir(os.path.join(saved, "v1")) if f.endswith(".safetensors")]) >= 3
    for source in ("v1", "v2"):
        assert _tensor_bytes(os.path.join(saved, source)) > 4_000_000


@pytest.mark.parametrize(("source", "world"), [("v1", 2), ("v1", 3), ("v2", 2), ("v2", 3)])
def test_each_process_reads_only_its_rows(saved, source, world):
    job = f"load-{source}"
    _spawn(world, job, saved)
    reference = load_file(os.path.join(saved, f"{source}_reference.safetensors"))
    whole = _tensor_bytes(os.path.join(saved, source))
    total_read = 0
    for rank in range(world):
        local = load_file(os.path.join(saved, f"{job}_{world}_{rank}.safetensors"))
        with open(os.path.join(saved, f"{job}_{world}_{rank}.json")) as f:
            report = json.load(f)
        # exactly the saved tensors' rows this process holds (FSDP2 splits dim 0 like torch.chunk)
        assert sorted(local) == sorted(reference)
        for key, full in reference.items():
            chunks = torch.chunk(full, world, dim=0)
            expected = chunks[rank] if rank < len(chunks) else full[:0]
            assert torch.equal(local[key], expected), key
        assert report["like_distribute"] == dict.fromkeys(reference, True)
        # the counter saw at least this process's own bytes, and well under the whole checkpoint
        own = sum(t.numel() * t.element_size() for t in local.values())
        assert own <= report["read"] < (0.7 if world == 2 else 0.5) * whole, (rank, report["read"], whole)
        total_read += report["read"]
    # together the processes read about the checkpoint once, not once each
    assert total_read < 1.3 * whole


def test_the_counter_sees_a_whole_read(saved):
    """Control: reading the whole checkpoint through the same reader counts at least its tensor bytes."""
    from hf_optim.state.reader import open_checkpoint

    whole = _tensor_bytes(os.path.join(saved, "v1"))
    with open_checkpoint(os.path.join(saved, "v1")) as ckpt:
        before = _rchar()
        ckpt.read_tensors(list(ckpt.entries))
        assert _rchar() - before >= whole


def test_a_failed_load_into_fsdp2_changes_nothing(saved):
    _spawn(2, "fail-v1", saved)
    for rank in range(2):
        with open(os.path.join(saved, f"fail-v1_{rank}.json")) as f:
            report = json.load(f)
        assert "scheduler" in report["error"]
        assert report["unchanged"]


# ---------------------------------------------------------------------------------------------------------------
# read_region: a box of a stored tensor, and only its bytes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "rows": torch.randn(101, 50, generator=g),
        "cube": torch.randn(7, 5, 3, generator=g, dtype=torch.float64),
        "half": torch.randn(9, 4, generator=g).to(torch.bfloat16),
        "vector": torch.randn(13, generator=g),
        "scalar": torch.tensor(2.5),
    }
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"k": "v"})
    f = open_file(path, roots=[str(tmp_path)])
    yield tensors, read_safetensors(f), path
    f.close()


def test_read_region_equals_slicing(stored):
    tensors, st, _ = stored
    rng = random.Random(0)
    for _ in range(300):
        key = rng.choice(sorted(tensors))
        full = tensors[key]
        offsets, sizes = [], []
        for dim in full.shape:
            o = rng.randint(0, dim)
            offsets.append(o)
            sizes.append(rng.randint(0, dim - o))
        got = read_region(st, key, tuple(offsets), tuple(sizes))
        expected = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
        assert got.dtype == full.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), (key, offsets, sizes)


def _read_counted(st, key, offsets, sizes) -> tuple[torch.Tensor, int, int]:
    base = _io()
    zero = _io()  # reading the counters reads a little itself: subtract that
    before = _io()
    out = read_region(st, key, offsets, sizes)
    after = _io()
    overhead = {k: zero[k] - base[k] for k in ("rchar", "syscr")}
    return (
        out,
        after["rchar"] - before["rchar"] - overhead["rchar"],
        after["syscr"] - before["syscr"] - overhead["syscr"],
    )


def test_read_region_reads_only_the_box(stored):
    _, st, _ = stored
    # a block of rows is one contiguous run: one read of exactly its bytes
    _, nbytes, calls = _read_counted(st, "rows", (10, 0), (20, 50))
    assert (nbytes, calls) == (20 * 50 * 4, 1)
    # a block of columns: one read per row, of the box's bytes only
    _, nbytes, calls = _read_counted(st, "rows", (10, 5), (20, 10))
    assert (nbytes, calls) == (20 * 10 * 4, 20)
    # the middle of a 3-d tensor, whole in its last two dimensions: one run
    _, nbytes, calls = _read_counted(st, "cube", (2, 0, 0), (3, 5, 3))
    assert (nbytes, calls) == (3 * 5 * 3 * 8, 1)
    _, nbytes, calls = _read_counted(st, "scalar", (), ())
    assert (nbytes, calls) == (4, 1)


def test_read_region_refuses_bad_boxes_and_a_truncated_file(stored):
    tensors, st, path = stored
    with pytest.raises(ValueError, match="outside"):
        read_region(st, "rows", (100, 0), (2, 50))
    with pytest.raises(ValueError, match="does not match"):
        read_region(st, "rows", (0,), (1,))
    last = max(st.starts, key=st.starts.get)
    os.truncate(path, st.starts[last] + 1)  # the file shrinks under the open descriptor
    with pytest.raises(CheckpointError, match="truncated"):
        read_region(st, last, (0,) * tensors[last].dim(), tuple(tensors[last].shape))


def test_tensor_starts_follow_the_header(stored):
    """The offsets derived from the library's validated header are the header's own ``data_offsets``."""
    _, st, path = stored
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__")
    assert st.starts == {key: 8 + size + entry["data_offsets"][0] for key, entry in header.items()}
