"""Optimizer step time: hf_optim vs torch.optim.AdamW, interleaved runs, median ms/step.

Each configuration spreads N float32 parameters over T tensors. Every optimizer under test gets its own copy of the
parameters and the same gradients; one step of each is timed in turn (interleaved, so drift in machine speed hits
all alike), repeated, and the median is reported with its ratio to ``torch.optim.AdamW(fused=True)`` and the
memory throughput against the 28 bytes/param an AdamW step must move (read p, g, m, v; write p, m, v).

    python scripts/bench_optimizers.py                # 1M/10, 20M/200, 100M/2000
    python scripts/bench_optimizers.py --sizes 20M/200 --repeats 30 --json
    python scripts/bench_optimizers.py --sizes 1M/10 --optimizers "hf_optim AdamW (compile)"  # compiled step
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import hf_optim

BYTES_PER_PARAM = 28

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True),
    "torch AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
    "torch AdamW for-loop": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=False),
    "hf_optim AdamW (default)": lambda p: hf_optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "hf_optim AdamW (reference)": lambda p: hf_optim.AdamW(
        p, lr=1e-3, weight_decay=0.01, foreach=False, fused=False
    ),
    "hf_optim AdamWeightDecay (default)": lambda p: hf_optim.AdamWeightDecay(
        p, learning_rate=1e-3, weight_decay_rate=0.01
    ),
    # pytorch-pretrained-bert's optimizers with their defaults: per-tensor clipping (BertAdam), schedule
    "hf_optim BertAdam (default)": lambda p: hf_optim.BertAdam(p, lr=1e-3, warmup=0.1, t_total=10**6),
    "hf_optim BertAdam (reference)": lambda p: hf_optim.BertAdam(
        p, lr=1e-3, warmup=0.1, t_total=10**6, foreach=False, fused=False
    ),
    "hf_optim BertAdam no clip (default)": lambda p: hf_optim.BertAdam(
        p, lr=1e-3, warmup=0.1, t_total=10**6, max_grad_norm=-1
    ),
    "hf_optim BertAdam all clipped (default)": lambda p: hf_optim.BertAdam(
        p, lr=1e-3, warmup=0.1, t_total=10**6, max_grad_norm=1e-3
    ),
    "hf_optim OpenAIAdam (default)": lambda p: hf_optim.OpenAIAdam(
        p, lr=1e-3, warmup=0.1, t_total=10**6, weight_decay=0.01
    ),
    "hf_optim OpenAIAdam (reference)": lambda p: hf_optim.OpenAIAdam(
        p, lr=1e-3, warmup=0.1, t_total=10**6, weight_decay=0.01, foreach=False, fused=False
    ),
}
BASELINE = "torch AdamW fused"


def compiled_step(factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
    """``factory`` with the optimizer's ``step`` replaced by ``torch.compile(step)`` (compiled in the warm-up)."""

    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = factory(params)
        opt.step = torch.compile(opt.step)  # type: ignore[method-assign]
        return opt

    return make


# Compiled-step rows: opt-in (``--optimizers``), compiling for thousands of tensors takes minutes on CPU.
COMPILED = {
    "torch AdamW (compile)": compiled_step(
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True)
    ),
    "hf_optim AdamW (compile)": compiled_step(lambda p: hf_optim.AdamW(p, lr=1e-3, weight_decay=0.01)),
    "hf_optim AdamWeightDecay (compile)": compiled_step(
        lambda p: hf_optim.AdamWeightDecay(p, learning_rate=1e-3, weight_decay_rate=0.01)
    ),
}
DEFAULT_OPTIMIZERS = list(OPTIMIZERS)
OPTIMIZERS.update(COMPILED)


def parse_size(spec: str) -> tuple[int, int]:
    """``"20M/200"`` -> (20_000_000, 200)."""
    numel, _, tensors = spec.partition("/")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(numel[-1].upper(), 1)
    return int(float(numel.rstrip("KMGkmg")) * scale), int(tensors or 1)


def bench(
    numel: int, num_tensors: int, names: list[str], repeats: int, warmup: int
) -> dict[str, list[float]]:
    sizes = [numel // num_tensors + (1 if i < numel % num_tensors else 0) for i in range(num_tensors)]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) * 1e-3 for n in sizes]
    optimizers = {}
    for name in names:
        params = [torch.randn(n, generator=g).requires_grad_() for n in sizes]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        optimizers[name] = OPTIMIZERS[name](params)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    del optimizers
    gc.collect()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1M/10", "20M/200", "100M/2000"], help="NUMEL/TENSORS")
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys([BASELINE, *args.optimizers]))

    rows = []
    for spec in args.sizes:
        numel, num_tensors = parse_size(spec)
        times = bench(numel, num_tensors, names, args.repeats, args.warmup)
        base = statistics.median(times[BASELINE])
        for name in names:
            ms = statistics.median(times[name])
            rows.append(
                {
                    "size": spec,
                    "params": numel,
                    "tensors": num_tensors,
                    "optimizer": name,
                    "median_ms": round(ms, 3),
                    "ratio_to_torch_fused": round(ms / base, 3),
                    "gb_per_s": round(numel * BYTES_PER_PARAM / (ms / 1e3) / 1e9, 1),
                }
            )
    if args.json:
        json.dump(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved steps"
    )
    header = f"| {'size':>10} | {'optimizer':<36} | {'ms/step':>9} | {'vs torch fused':>14} | {'GB/s':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['size']:>10} | {r['optimizer']:<36} | {r['median_ms']:>9.2f} | "
            f"{r['ratio_to_torch_fused']:>13.2f}x | {r['gb_per_s']:>6.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
