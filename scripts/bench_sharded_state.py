#!/usr/bin/env python
"""Benchmark sharded (FSDP2) optimizer-state saving and loading on 2 CPU processes.

    python scripts/bench_sharded_state.py                       # ~200M state elements (100M params x 2 moments)
    python scripts/bench_sharded_state.py --numel 10_000_000 --repeats 2

Three ways to save the same AdamW state of an FSDP2 model (``fully_shard`` on every layer), interleaved, each
``--repeats`` times; the best time counts (disk noise only adds time):

- ``hf_optim``: ``hf_optim.state.sharded.save_sharded_state`` (DCP + HuggingFaceStorageWriter, JSON manifest);
- ``dcp``: ``torch.distributed.checkpoint.save`` of ``get_optimizer_state_dict`` with its default
  ``FileSystemWriter`` (pickled ``.metadata``);
- ``gather``: ``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`` to rank 0 + ``torch.save``.

Loads resume into a fresh model and optimizer (``load_sharded_state`` vs ``get_optimizer_state_dict`` +
``dcp.load`` + ``set_optimizer_state_dict``), so both allocate the state itself (1x the shard). Peak extra memory
per process is the VmHWM increase during the operation (reset through /proc/self/clear_refs), as a multiple of
that process's own shard of the state.

Consolidation of the ``hf_optim`` checkpoint into the single-process one, in a fresh subprocess each time (after
the 2-process run): ``hf_optim.consolidate_state`` (streaming, one full tensor at a time) against an in-memory
reference (every full tensor built first, then ``save_state_dict``); peak extra memory as a multiple of the
largest state tensor and of the whole state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(numel: int, layers: int, *, with_state: bool = True):
    from torch.distributed.fsdp import fully_shard

    import hf_optim

    width = int((numel / layers) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = hf_optim.AdamW(model.parameters(), lr=1e-3)
    if not with_state:
        return model, opt
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    return model, opt


def _shard_bytes(opt) -> int:
    return sum(
        t.to_local().numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim()
    )


def _timed(fn) -> tuple[float, int]:
    os.sync()  # every row starts from written-back page cache (untimed), not under the previous row's writes
    dist.barrier()
    _reset_peak()
    base = _status("VmRSS")
    start = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = time.perf_counter() - start
    return elapsed, _status("VmHWM") - base


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _bench(rank, args, out)  # its sharded models (their device mesh holds the group) go with its frame
    gc.collect()
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def _bench(rank: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from hf_optim.state.sharded import load_sharded_state, save_sharded_state

    torch.set_num_threads(1)
    # dcp.save's default writer overwrites the previous round's checkpoint, and says so every time
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint", category=UserWarning)
    model, opt = _build(args.numel // 2, args.layers)  # two moments: numel // 2 parameters
    shard = _shard_bytes(opt)
    root = args.root

    def save_hf():
        save_sharded_state(os.path.join(root, "hf"), opt, model=model)

    def save_dcp():
        dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=os.path.join(root, "dcp"))

    def save_gather():
        full = get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            torch.save(full, os.path.join(root, "gather.pt"))

    # a resume: load into a fresh model and optimizer (no state yet), built before the clock starts
    fresh: list = []

    def load_hf():
        model2, opt2 = fresh[-1]
        load_sharded_state(os.path.join(root, "hf"), opt2, model=model2)

    def load_dcp():
        model2, opt2 = fresh[-1]
        sd = get_optimizer_state_dict(model2, opt2)  # allocates the state (torch runs a zero-gradient step)
        dcp.load(sd, checkpoint_id=os.path.join(root, "dcp"))
        set_optimizer_state_dict(model2, opt2, sd)

    results: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeats):
        for name, fn in (("save hf_optim", save_hf), ("save dcp", save_dcp), ("save gather", save_gather)):
            results.setdefault(name, []).append(_timed(fn))
        for name, fn in (("load hf_optim", load_hf), ("load dcp", load_dcp)):
            fresh[:] = [_build(args.numel // 2, args.layers, with_state=False)]
            results.setdefault(name, []).append(_timed(fn))
            fresh.clear()
    summary = {
        name: {"best_s": min(t for t, _ in runs), "peak_extra_bytes": max(m for _, m in runs)}
        for name, runs in results.items()
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"shard_bytes": shard, "results": summary}, f)


def _consolidate_child(mode: str, src: str, dst: str) -> None:
    """One consolidation in this (fresh) process; prints time, peak extra RSS and the state's sizes as JSON."""
    import hf_optim
    from hf_optim.state.sharded import open_consolidation

    with open_consolidation(src) as source:  # sizes only: nothing of the tensors is read
        sizes = [plan.dtype.itemsize * _numel(plan.shape) for plan in source.manifest.tensors.values()]

    def in_memory() -> None:
        with open_consolidation(src) as source:
            state = source.state_dict
            for index, entries in state["state"].items():
                for key, value in entries.items():
                    if torch.is_tensor(value) and value.is_meta:
                        entries[key] = source.full_tensor(index, key)
            hf_optim.save_state_dict(
                dst,
                state,
                param_shapes=source.param_shapes,
                optimizer_class=source.optimizer_class,
                scheduler_state=source.scheduler_state,
                scheduler_class=source.scheduler_class,
                scheduler_name=source.scheduler_name,
                scheduler_kwargs=source.scheduler_kwargs,
            )

    run = {"streaming": lambda: hf_optim.consolidate_state(src, dst), "in memory": in_memory}[mode]
    _reset_peak()
    base = _status("VmRSS")
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {"s": elapsed, "peak": _status("VmHWM") - base, "total": sum(sizes), "largest": max(sizes)}
        )
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bench_consolidation(src: str, root: str, repeats: int) -> None:
    results: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for mode in ("streaming", "in memory"):
            dst = os.path.join(root, "consolidated")
            shutil.rmtree(dst, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, __file__, "--consolidate-child", mode, src, dst],
                check=True,
                capture_output=True,
                text=True,
            )
            results.setdefault(mode, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = results["streaming"][0]
    print(
        f"\nconsolidation in 1 process: state {first['total'] / 1e6:.0f} MB, largest tensor "
        f"{first['largest'] / 1e6:.1f} MB"
    )
    print(f"{'':26} {'best time':>10} {'peak extra':>11} {'/ largest tensor':>17} {'/ state':>8}")
    for mode, runs in results.items():
        t, peak = min(r["s"] for r in runs), max(r["peak"] for r in runs)
        print(
            f"{'consolidate ' + mode:26} {t:9.3f}s {peak / 1e6:8.0f} MB {peak / first['largest']:16.2f}x "
            f"{peak / first['total']:7.2f}x"
        )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--consolidate-child":
        _consolidate_child(*sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--numel", type=lambda s: int(s.replace("_", "")), default=200_000_000, help="state elements"
    )
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-sharded-")
    args.root = root
    out = tempfile.mkdtemp(prefix="bench-sharded-results-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_worker, args=(2, port, args, out), nprocs=2, join=True)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]  # noqa: SIM115
        _report(args, ranks)
        _bench_consolidation(os.path.join(root, "hf"), root, args.repeats)
    finally:
        if args.root is root and root.startswith(tempfile.gettempdir()):
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def _report(args: argparse.Namespace, ranks: list[dict]) -> None:
    shard = max(r["shard_bytes"] for r in ranks)
    print(f"2 processes, {args.numel:,} state elements, {shard / 1e6:.0f} MB of state per process")
    print(f"{'':16} {'best time':>10} {'vs dcp':>7} {'peak extra / shard (max over ranks)':>38}")
    for op in ("save", "load"):
        base = max(r["results"][f"{op} dcp"]["best_s"] for r in ranks)
        for way in ("hf_optim", "dcp", "gather"):
            key = f"{op} {way}"
            if key not in ranks[0]["results"]:
                continue
            t = max(r["results"][key]["best_s"] for r in ranks)
            mem = [r["results"][key]["peak_extra_bytes"] / r["shard_bytes"] for r in ranks]
            print(
                f"{key:16} {t:9.3f}s {t / base:6.2f}x {'  '.join(f'rank{i} {m:.2f}x' for i, m in enumerate(mem)):>38}"
            )


if __name__ == "__main__":
    main()
