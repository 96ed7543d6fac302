#!/usr/bin/env python
"""Benchmark an Accelerate training loop (one process): hf_optim's ``adamw_hf`` against
``torch.optim.AdamW(fused=True)``, and ``hf_optim.ItemNormalizer`` against hand-written item-normalised
accumulation.

Variants (same model, data, Accelerate loop with ``accelerator.accumulate``):

* ``torch_fused+manual``  torch.optim.AdamW(fused=True), hand-written normalisation (the baseline)
* ``adamw_hf+manual``     hf_optim.create_optimizer("adamw_hf"), hand-written normalisation
* ``adamw_hf+helper``     hf_optim.create_optimizer("adamw_hf"), ``ItemNormalizer.backward``

"Hand-written" reads the K micro-batches of a window ahead, counts their items and back-propagates
``loss_sum * K / items`` (undoing ``accelerator.backward``'s division by K): the same update as the helper.
Variants run interleaved, round after round; the table gives the mean time per optimizer step in the best and
the median round, the optimizer's own share, and the ratios the project targets (<= 1.02 each), computed
from the best rounds.

    python scripts/bench_accelerate.py [--rounds 5] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

import hf_optim

VARIANTS = ("torch_fused+manual", "adamw_hf+manual", "adamw_hf+helper")


def _task_module() -> Any:
    path = Path(__file__).resolve().parent / "train_accelerate.py"
    spec = importlib.util.spec_from_file_location("train_accelerate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median taken over them)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps timed per variant and round")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps K")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "accumulation", "batch_size", "seq_len", "vocab_size", "hidden_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class _Run:
    """One variant: its own Accelerator, model, optimizer and micro-batches (the same data for every variant)."""

    def __init__(self, variant: str, args: argparse.Namespace, task: Any) -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        self.variant = variant
        self.k = args.accumulation
        self.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=self.k)
        self.task = task
        model = task.build_model(args.vocab_size, args.hidden_size, seed=0)
        if variant.startswith("torch_fused"):
            # the same decay / no-decay groups as create_optimizer builds
            groups = hf_optim.group_parameters(model, weight_decay=0.01)
            optimizer = torch.optim.AdamW(groups, lr=1e-3, eps=1e-6, fused=True)
        else:
            optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-3, weight_decay=0.01)
        data = task.build_dataset(args.batch_size * self.k * 4, args.seq_len, args.vocab_size, seed=0)
        # Batches are materialised once: the variants run interleaved, and several prepared dataloaders
        # suspended mid-epoch would share Accelerate's process-wide end-of-dataloader state.
        self.batches = list(DataLoader(data, batch_size=args.batch_size, shuffle=False))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.normalizer = (
            hf_optim.ItemNormalizer(self.accelerator, self.model) if variant.endswith("helper") else None
        )
        self._batches = itertools.cycle(self.batches)
        self.optimizer_seconds = 0.0

    def step(self) -> None:
        """One optimizer step = one window of K micro-batches."""
        acc, model = self.accelerator, self.model
        if self.normalizer is not None:
            for _ in range(self.k):
                batch = next(self._batches)
                with acc.accumulate(model):
                    loss_sum, num_items = self.task.loss_sum_and_items(model, batch)
                    self.normalizer.backward(loss_sum, num_items)
                    self._optimizer_step()
            return
        window = [next(self._batches) for _ in range(self.k)]  # read ahead to count the window's items
        items = acc.reduce(sum((b[1] != -100).sum() for b in window), reduction="sum")
        scale = self.k * acc.num_processes / items.clamp(min=1)
        for batch in window:
            with acc.accumulate(model):
                loss_sum, _ = self.task.loss_sum_and_items(model, batch)
                acc.backward(loss_sum * scale)
                self._optimizer_step()

    def _optimizer_step(self) -> None:
        start = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.accelerator.sync_gradients:
            self.optimizer_seconds += time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    task = _task_module()
    runs = {v: _Run(v, args, task) for v in VARIANTS}
    n_params = sum(p.numel() for p in runs[VARIANTS[0]].model.parameters())
    for run in runs.values():
        for _ in range(args.warmup_steps):
            run.step()
    step_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    opt_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            run = runs[variant]
            run.optimizer_seconds = 0.0
            start = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            step_ms[variant].append(1000 * (time.perf_counter() - start) / args.steps)
            opt_ms[variant].append(1000 * run.optimizer_seconds / args.steps)
    rows = {
        v: {
            "step_ms_best": min(step_ms[v]),
            "step_ms_median": statistics.median(step_ms[v]),
            "optimizer_ms_best": min(opt_ms[v]),
        }
        for v in VARIANTS
    }
    # Ratios use the best round of each variant (as timeit does): other load on the machine only adds time.
    base, hf_manual, hf_helper = (rows[v]["step_ms_best"] for v in VARIANTS)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"}
        | {"parameters": n_params, "torch_threads": torch.get_num_threads()},
        "variants": rows,
        "ratios": {
            "adamw_hf / torch fused (loop, target <= 1.02)": hf_manual / base,
            "helper / hand-written accumulation (target <= 1.02)": hf_helper / hf_manual,
            "adamw_hf / torch fused (optimizer step only)": rows[VARIANTS[1]]["optimizer_ms_best"]
            / rows[VARIANTS[0]]["optimizer_ms_best"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cfg = result["config"]
    print(
        f"Accelerate loop, 1 process, {cfg['parameters'] / 1e6:.2f}M parameters, batch {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, K={cfg['accumulation']}, {cfg['torch_threads']} threads, "
        f"{cfg['rounds']} rounds x {cfg['steps']} steps"
    )
    print(f"{'variant':<22} {'ms/step best':>13} {'ms/step median':>15} {'optimizer ms/step best':>23}")
    for variant, row in result["variants"].items():
        print(
            f"{variant:<22} {row['step_ms_best']:>13.2f} {row['step_ms_median']:>15.2f} "
            f"{row['optimizer_ms_best']:>23.2f}"
        )
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
