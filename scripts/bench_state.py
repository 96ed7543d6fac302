#!/usr/bin/env python
"""Benchmark hf_optim.save_state / load_state against torch.save / torch.load for an AdamW state.

    python scripts/bench_state.py                      # 100M elements per moment (~800 MB of state)
    python scripts/bench_state.py --numel 10_000_000 --repeats 5 --json

Save: ``save_state`` (default, no fsync; and ``fsync=True``) vs ``torch.save(optimizer.state_dict())`` (and
``torch.save`` + fsync, for an apples-to-apples durable save), interleaved, median of ``--repeats``.
Load: each measurement runs in a fresh subprocess that builds the model and a fresh optimizer, then times
``load_state`` vs ``torch.load(weights_only=True)`` + ``optimizer.load_state_dict`` and records the peak RSS
increase during the load (VmHWM after resetting it through /proc/self/clear_refs; Linux only).
Disk timings are noisy: run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def build(numel: int, tensors: int, *, with_state: bool):
    per = numel // tensors
    params = [torch.nn.Parameter(torch.randn(per)) for _ in range(tensors)]
    opt = torch.optim.AdamW([(f"layers.{i}.weight", p) for i, p in enumerate(params)], lr=1e-3)
    if with_state:
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            p.grad = None
    return params, opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def child(method: str, path: str, numel: int, tensors: int) -> None:
    """One load in a fresh process: prints {"seconds": ..., "peak_extra_bytes": ...}."""
    import hf_optim

    _, opt = build(numel, tensors, with_state=False)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = max(_vm_rss(), 0)
    hwm_before = _vm_hwm()
    start = time.perf_counter()
    if method == "load_state":
        hf_optim.load_state(path, opt)
    else:
        opt.load_state_dict(torch.load(path, weights_only=True))
    seconds = time.perf_counter() - start
    peak = max(_vm_hwm(), hwm_before)
    print(
        json.dumps({"seconds": seconds, "peak_extra_bytes": peak - before, "state_bytes": state_bytes(opt)})
    )


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--numel",
        type=lambda s: int(s.replace("_", "")),
        default=100_000_000,
        help="elements per moment (default 100M)",
    )
    parser.add_argument("--tensors", type=int, default=100, help="number of parameter tensors (default 100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--_child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child[0], args._child[1], args.numel, args.tensors)
        return

    import hf_optim

    workdir = args.dir or tempfile.mkdtemp(prefix="bench_state-")
    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "hf_optim")
    pt = os.path.join(workdir, "optimizer.pt")
    _, opt = build(args.numel, args.tensors, with_state=True)
    size = state_bytes(opt)

    def torch_save() -> None:
        torch.save(opt.state_dict(), pt)

    def torch_save_fsync() -> None:
        torch.save(opt.state_dict(), pt)
        _fsync(pt)

    saves = {
        "save_state": lambda: hf_optim.save_state(ckpt, opt),
        "save_state(fsync=True)": lambda: hf_optim.save_state(ckpt, opt, fsync=True),
        "torch.save": torch_save,
        "torch.save + fsync": torch_save_fsync,
    }
    times: dict[str, list[float]] = {k: [] for k in saves}
    for _ in range(args.repeats):  # interleaved
        for name, fn in saves.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    save_median = {k: statistics.median(v) for k, v in times.items()}

    loads: dict[str, list[dict]] = {"load_state": [], "torch.load + load_state_dict": []}
    for _ in range(args.repeats):
        for name, path in (("load_state", ckpt), ("torch.load + load_state_dict", pt)):
            method = "load_state" if name == "load_state" else "torch"
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--numel",
                    str(args.numel),
                    "--tensors",
                    str(args.tensors),
                    "--_child",
                    method,
                    path,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            loads[name].append(json.loads(out.strip().splitlines()[-1]))
    load_median = {k: statistics.median(r["seconds"] for r in v) for k, v in loads.items()}
    load_peak = {k: max(r["peak_extra_bytes"] for r in v) for k, v in loads.items()}

    result = {
        "numel_per_moment": args.numel,
        "tensors": args.tensors,
        "state_bytes": size,
        "repeats": args.repeats,
        "save_seconds": save_median,
        "load_seconds": load_median,
        "load_peak_extra_bytes": load_peak,
        "ratios": {
            "save_state / torch.save": save_median["save_state"] / save_median["torch.save"],
            "save_state(fsync=True) / (torch.save + fsync)": save_median["save_state(fsync=True)"]
            / save_median["torch.save + fsync"],
            "load_state / (torch.load + load_state_dict)": load_median["load_state"]
            / load_median["torch.load + load_state_dict"],
            "load_state peak extra / state size": load_peak["load_state"] / size,
            "torch.load peak extra / state size": load_peak["torch.load + load_state_dict"] / size,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"AdamW state: {args.numel:,} elements per moment in {args.tensors} tensors, {size / 1e6:.0f} MB; "
        f"median of {args.repeats}"
    )
    print(f"{'operation':<34}{'seconds':>9}")
    for k, v in save_median.items():
        print(f"{k:<34}{v:>9.3f}")
    for k, v in load_median.items():
        print(f"{k:<34}{v:>9.3f}   peak extra memory {load_peak[k] / 1e6:.0f} MB")
    print()
    for k, v in result["ratios"].items():
        print(f"{k:<46}{v:>6.2f}x")


if __name__ == "__main__":
    main()
