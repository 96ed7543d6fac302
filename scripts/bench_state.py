#!/usr/bin/env python
"""Benchmark hf_optim.save_state / load_state against torch.save / torch.load for an AdamW state.

    python scripts/bench_state.py                  # ~800 MB of state (two moments of 100M float32)
    python scripts/bench_state.py --size-mb 200 --rounds 5 --json

Rounds are interleaved (saves into a fresh folder and over the previous checkpoint, loads, memcpy) and the best
of each is reported: disk and page-cache noise only ever adds time. Loads are also timed up to the first use of
every state tensor (a lazily mapped load pays its page faults there). Every load goes into a fresh optimizer without
state. The floor is one memcpy of the state into freshly allocated memory (what any load must at least do:
copy from the page cache and fault in new pages).

The cost of the load-time hardening checks (metadata validation, hyperparameter / scheduler / state checks,
regular-file and checkpoint-id checks) is measured by timing those functions inside ``load_state``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch

import hf_optim
from hf_optim.state import checks, load, reader


def build(numel: int, tensors: int, *, with_state: bool) -> torch.optim.Optimizer:
    per = numel // tensors
    params = [torch.nn.Parameter(torch.zeros(per)) for _ in range(tensors)]
    opt = torch.optim.AdamW([(f"layers.{i}.weight", p) for i, p in enumerate(params)], lr=1e-3)
    if with_state:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in params:
            p.grad = None
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CheckTimer:
    """Wraps the hardening checks called by load_state and sums the time spent in them."""

    TARGETS = (
        (load, "check_param_state"),
        (load, "check_hyperparameters"),
        (load, "check_same_structure"),
        (reader, "validate_optimizer_meta"),
        (reader, "open_file"),
        (reader, "read_checkpoint_id"),
        (reader.Checkpoint, "check_unchanged"),
        (checks, "_construct_check"),
    )

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> CheckTimer:
        for owner, name in self.TARGETS:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)

    def _wrap(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if self._depth:  # nested check: counted by the outer one
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self._depth -= 1

        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=800, help="optimizer state size (default 800)")
    parser.add_argument("--tensors", type=int, default=100, help="number of parameter tensors (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    numel = int(args.size_mb * 1e6 / 8)  # two float32 moments per element
    workdir = args.dir or tempfile.mkdtemp(prefix="bench_state-")
    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "hf_optim")
    pt = os.path.join(workdir, "optimizer.pt")
    opt = build(numel, args.tensors, with_state=True)
    size = state_bytes(opt)
    state_tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]

    def first_use(fresh: torch.optim.Optimizer) -> None:
        """Read every loaded state tensor once (a lazily mapped load pays its page faults here)."""
        for s in fresh.state.values():
            for t in s.values():
                if torch.is_tensor(t):
                    t.sum()

    def torch_load() -> tuple[float, float]:
        fresh = build(numel, args.tensors, with_state=False)
        start = time.perf_counter()
        fresh.load_state_dict(torch.load(pt, weights_only=True))
        seconds = time.perf_counter() - start
        first_use(fresh)
        return seconds, time.perf_counter() - start

    def hf_load() -> tuple[float, float, float]:
        fresh = build(numel, args.tensors, with_state=False)
        with CheckTimer() as checks_timer:
            start = time.perf_counter()
            hf_optim.load_state(ckpt, fresh)
            seconds = time.perf_counter() - start
        first_use(fresh)
        return seconds, time.perf_counter() - start, checks_timer.seconds

    def memcpy() -> None:
        for t in state_tensors:
            torch.empty_like(t).copy_(t)

    results: dict[str, list[float]] = {
        "save_state": [],
        "torch.save": [],
        "save_state over the previous one": [],
        "torch.save over the previous one": [],
        "torch.save to a temporary + rename over": [],
        "load_state": [],
        "torch.load + load_state_dict": [],
        "load_state, then first use": [],
        "torch.load + ..., then first use": [],
        "memcpy floor": [],
        "hardening checks": [],
    }

    def settled(fn) -> float:
        os.sync()
        return timed(fn)

    def atomic_torch_save(path: str) -> None:
        torch.save(opt.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    for _ in range(args.rounds):
        # into a fresh folder / file, as Trainer's checkpoint-N folders are (the previous ones removed untimed)
        shutil.rmtree(ckpt, ignore_errors=True)
        if os.path.exists(pt):
            os.remove(pt)
        # Every save starts from written-back page cache (os.sync, untimed): otherwise a save pays for the dirty
        # pages of whatever ran before it, and the order of the rows decides the result.
        results["save_state"].append(settled(lambda: hf_optim.save_state(ckpt, opt)))
        results["torch.save"].append(settled(lambda: torch.save(opt.state_dict(), pt)))
        # over the previous checkpoint: save_state keeps it loadable until the new one is in place, as torch.save
        # into a temporary file renamed over the old one does; plain torch.save truncates the old file first (a
        # kill then leaves no checkpoint) and never writes its pages back
        results["save_state over the previous one"].append(settled(lambda: hf_optim.save_state(ckpt, opt)))
        results["torch.save over the previous one"].append(settled(lambda: torch.save(opt.state_dict(), pt)))
        results["torch.save to a temporary + rename over"].append(settled(lambda: atomic_torch_save(pt)))
        seconds, with_use, check_seconds = hf_load()
        results["load_state"].append(seconds)
        results["load_state, then first use"].append(with_use)
        results["hardening checks"].append(check_seconds)
        seconds, with_use = torch_load()
        results["torch.load + load_state_dict"].append(seconds)
        results["torch.load + ..., then first use"].append(with_use)
        results["memcpy floor"].append(timed(memcpy))
    best = {k: min(v) for k, v in results.items()}
    ratios = {
        "save_state / torch.save": best["save_state"] / best["torch.save"],
        "the same, over the previous checkpoint (torch.save to a temporary + rename)": best[
            "save_state over the previous one"
        ]
        / best["torch.save to a temporary + rename over"],
        "the same, against torch.save truncating the previous file": best["save_state over the previous one"]
        / best["torch.save over the previous one"],
        "load_state / (torch.load + load_state_dict)": best["load_state"]
        / best["torch.load + load_state_dict"],
        "the same, including the first use": best["load_state, then first use"]
        / best["torch.load + ..., then first use"],
        "hardening checks / load_state": best["hardening checks"] / best["load_state"],
    }
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {"state_bytes": size, "rounds": args.rounds, "best_seconds": best, "ratios": ratios}, indent=2
            )
        )
        return
    print(
        f"AdamW state: {size / 1e6:.0f} MB in {args.tensors} parameters; best of {args.rounds} interleaved rounds"
    )
    for k, v in best.items():
        print(
            f"  {k:<32}{v:>8.3f} s   {size / v / 1e9:>6.2f} GB/s"
            if k != "hardening checks"
            else f"  {k:<32}{v:>8.3f} s"
        )
    for k, v in ratios.items():
        print(f"  {k:<46}{v:>7.3f}")


if __name__ == "__main__":
    main()
