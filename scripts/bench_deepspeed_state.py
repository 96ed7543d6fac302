#!/usr/bin/env python
"""Benchmark DeepSpeed ZeRO optimizer-state saving and loading on 2 CPU processes.

    python scripts/bench_deepspeed_state.py                      # ~200M state elements (100M params x 2 moments)
    python scripts/bench_deepspeed_state.py --numel 10_000_000 --repeats 2 --stage 3

On the same ZeRO engine (``DS_ACCELERATOR=cpu``, gloo, fp32, AdamW client optimizer, one step taken), interleaved,
``--repeats`` times each; the best time counts (disk noise only adds time):

- ``hf_optim save``: ``hf_optim.save_state(dir, zero_optimizer, model=engine)`` (each process its partition);
- ``deepspeed save``: ``engine.save_checkpoint(dir)``, which also writes the model's weights (rank 0);
- ``deepspeed optimizer file``: ``torch.save(zero_optimizer.state_dict())``, what that writes per process for
  the optimizer alone (``zero_pp_rank_R_mp_rank_00_optim_states.pt``);
- ``hf_optim load``: ``hf_optim.load_state`` into the same engine;
- ``deepspeed load``: ``engine.load_checkpoint(dir)`` (model weights and optimizer);
- ``hf_optim convert``: ``hf_optim.state.convert.convert_checkpoint`` of DeepSpeed's checkpoint (both ranks'
  files, by one process: rank 0) into hf_optim's format and ``model.safetensors``, into a new folder each time.

Peak extra memory per process is the VmHWM increase during the operation (reset through /proc/self/clear_refs), as
a multiple of that process's partition of the optimizer state (its ``exp_avg`` and ``exp_avg_sq``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")

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


def _timed(fn) -> tuple[float, int]:
    os.sync()  # every row starts from written-back page cache (untimed)
    dist.barrier()
    _reset_peak()
    base = _status("VmRSS")
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start, _status("VmHWM") - base


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import deepspeed

    import hf_optim
    from hf_optim.state.convert import convert_checkpoint

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    width = int((args.numel // 2 / args.layers) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(args.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "train_batch_size": world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x = torch.randn(1, width)
    engine.backward(engine(x).sum())
    engine.step()
    partition = sum(
        v.numel() * v.element_size() for s in zopt.optimizer.state.values() for v in s.values() if v.dim()
    )
    root = args.root
    hf_dir, ds_dir, pt_dir = (os.path.join(root, n) for n in ("hf", "ds", "pt"))
    os.makedirs(pt_dir, exist_ok=True)
    rows = {
        "hf_optim save": lambda: hf_optim.save_state(hf_dir, zopt, model=engine),
        "deepspeed save": lambda: engine.save_checkpoint(ds_dir, tag="bench"),
        "deepspeed optimizer file": lambda: torch.save(
            zopt.state_dict(), os.path.join(pt_dir, f"optim_{rank}.pt")
        ),
        "hf_optim load": lambda: hf_optim.load_state(hf_dir, zopt, model=engine),
        "deepspeed load": lambda: engine.load_checkpoint(ds_dir, tag="bench"),
        "hf_optim convert": lambda: (
            rank == 0
            and convert_checkpoint(ds_dir, output=os.path.join(root, f"converted-{os.urandom(4).hex()}"))
        ),
    }
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            elapsed, extra = _timed(fn)
            old = best.get(name)
            best[name] = (min(elapsed, old[0]) if old else elapsed, min(extra, old[1]) if old else extra)
    with open(os.path.join(out, f"bench_{rank}.json"), "w") as f:
        json.dump({"partition": partition, "rows": best}, f)
    rows.clear()
    engine = zopt = opt = model = None  # released before the process group is torn down
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=200_000_000, help="state elements (2 moments x parameters)")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="bench-ds-")
    args.root = args.root or os.path.join(out, "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
        results = []
        for r in range(2):
            with open(os.path.join(out, f"bench_{r}.json")) as f:
                results.append(json.load(f))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = results[0]["rows"]
    print(f"ZeRO-{args.stage}, 2 processes, {args.numel / 1e6:.0f}M state elements, "
          f"partition {results[0]['partition'] / 1e6:.0f} MB per process; best of {args.repeats}")  # fmt: skip
    print(f"{'':28s} {'time':>8s} {'vs deepspeed':>13s} {'extra memory / partition (rank 0, rank 1)':>44s}")
    for name in rows:
        base = rows["deepspeed save" if "save" in name or "file" in name else "deepspeed load"][0]
        versus = "-" if "convert" in name else f"{rows[name][0] / base:.2f}x"
        ratios = ", ".join(f"{r['rows'][name][1] / r['partition']:.2f}x" for r in results)
        print(f"{name:28s} {rows[name][0]:7.2f}s {versus:>13s} {ratios:>44s}")


if __name__ == "__main__":
    main()
