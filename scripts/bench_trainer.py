#!/usr/bin/env python
"""Benchmark the transformers integration: Trainer step time, checkpoint save time, start-up hook cost.

1. ``train``: Trainer step time (median over steps, forward + backward + optimizer + scheduler) with
   ``optim="adamw_hf"`` (and ``adam_weight_decay``) vs ``optim="adamw_torch_fused"``, same BERT model, data, steps.
   Target: adamw_hf <= 1.02x adamw_torch_fused.
2. ``save``: writing a checkpoint's optimizer + scheduler state, ``hf_optim.Trainer`` (``optimizer.safetensors``
   + ``scheduler.json``) vs stock ``transformers.Trainer`` (``optimizer.pt`` + ``scheduler.pt``), and the whole
   ``_save_checkpoint`` (model, optimizer, RNG, trainer state) of both. Target: hf_optim <= 1.0x stock.
3. ``startup``: what the ``.pth`` hook adds to every interpreter start (``python -X importtime``,
   ``_hf_optim_autoload`` cumulative time). Target: < 5 ms.

Runs are interleaved (A B B A ...) and the median is reported; on a busy machine expect noise of several %.

    python scripts/bench_trainer.py [--steps 30] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
)
from transformers import Trainer as TransformersTrainer
from transformers.utils import logging as hf_logging

import hf_optim


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def make_model(args: argparse.Namespace) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(64, args.seq_len),
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def training_args(output_dir: str, optim: str, steps: int, batch: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        optim=optim,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        weight_decay=0.01,
        warmup_steps=2,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, scheduler), from step begin to end."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)


def bench_train(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Median step time over all runs (each run's first 2 steps and one warm-up run per optimizer dropped)."""
    optims = ["adamw_torch_fused", "adamw_hf", "adam_weight_decay"]
    data = RandomTokens(args.steps * args.batch, args.seq_len, args.vocab_size)
    times: dict[str, list[float]] = {o: [] for o in optims}
    for r in range(args.repeats + 1):
        order = optims if r % 2 == 0 else optims[::-1]
        for optim in order:
            timer = StepTimer()
            trainer = TransformersTrainer(
                model=make_model(args),
                args=training_args(workdir, optim, args.steps, args.batch),
                train_dataset=data,
                callbacks=[timer],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            if r > 0:  # run 0 warms up allocator, kernels and caches
                times[optim].extend(timer.durations[2:])
    base = statistics.median(times["adamw_torch_fused"])
    rows = {
        o: {"ms_per_step": 1000 * statistics.median(t), "ratio": statistics.median(t) / base}
        for o, t in times.items()
    }
    n_params = sum(p.numel() for p in make_model(args).parameters())
    return {"params": n_params, "steps": args.steps, "repeats": args.repeats, "rows": rows}


def bench_optimizer_step(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """``optimizer.step()`` alone, optimizers built by Trainer (its groups, TrainingArguments mapping), same grads."""
    optims = ["adamw_torch_fused", "adamw_hf", "adam_weight_decay"]
    model = make_model(args)
    optimizers = {}
    for optim in optims:
        trainer = TransformersTrainer(model=model, args=training_args(workdir, optim, 1, args.batch))
        optimizers[optim] = trainer.create_optimizer()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    times: dict[str, list[float]] = {o: [] for o in optims}
    with torch.no_grad():
        for r in range(10 * args.repeats + 3):
            order = optims if r % 2 == 0 else optims[::-1]
            for optim in order:
                start = time.perf_counter()
                optimizers[optim].step()
                if r >= 3:
                    times[optim].append(time.perf_counter() - start)
    base = statistics.median(times["adamw_torch_fused"])
    return {
        o: {"ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base} for o, t in times.items()
    }


def _trained(trainer_cls: type, args: argparse.Namespace, workdir: str) -> Any:
    data = RandomTokens(2 * args.batch, args.seq_len, args.vocab_size)
    trainer = trainer_cls(
        model=make_model(args), args=training_args(workdir, "adamw_hf", 2, args.batch), train_dataset=data
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()  # optimizer state exists now
    return trainer


def bench_save(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    trainers = {
        "transformers.Trainer": _trained(TransformersTrainer, args, workdir),
        "hf_optim.Trainer": _trained(hf_optim.Trainer, args, workdir),
    }
    parts = {
        "optimizer+scheduler": lambda t, d: t._save_optimizer_and_scheduler(d),
        "whole checkpoint": lambda t, d: t._save_checkpoint(t.model, trial=None),
    }
    results: dict[str, Any] = {}
    for part, save in parts.items():
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(args.repeats * 2):
            order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
            for name in order:
                trainer = trainers[name]
                out = os.path.join(workdir, f"save-{r}-{name}")
                trainer.args.output_dir = out
                os.makedirs(out, exist_ok=True)
                start = time.perf_counter()
                save(trainer, out)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out, ignore_errors=True)
        base = statistics.median(times["transformers.Trainer"])
        results[part] = {
            name: {"ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / base}
            for name, t in times.items()
        }
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in trainers["hf_optim.Trainer"].optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return {"optimizer_state_mb": state_bytes / 2**20, "parts": results}


def bench_startup(repeats: int) -> dict[str, Any]:
    """Cumulative ``-X importtime`` of ``_hf_optim_autoload`` (the module the .pth imports)."""
    samples = []
    env = {k: v for k, v in os.environ.items() if k != "HF_OPTIM_DISABLE_AUTOLOAD"}
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env
        ).stderr
        match = re.search(r"import time:\s*\d+\s*\|\s*(\d+)\s*\|\s*_hf_optim_autoload\s*$", out, re.M)
        if match:
            samples.append(int(match.group(1)) / 1000)
    if not samples:
        return {"installed": False}
    return {
        "installed": True,
        "ms_median": statistics.median(samples),
        "ms_max": max(samples),
        "runs": len(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (median reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument(
        "--only",
        choices=["train", "save", "startup"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("hf_optim").setLevel(logging.WARNING)
    parts = args.only or ["train", "save", "startup"]

    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="hf_optim_bench_") as workdir:
        if "train" in parts:
            results["train"] = bench_train(args, workdir)
            results["optimizer_step"] = bench_optimizer_step(args, workdir)
        if "save" in parts:
            results["save"] = bench_save(args, workdir)
    if "startup" in parts:
        results["startup"] = bench_startup(max(10, args.repeats * 4))

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if "train" in results:
        r = results["train"]
        print(
            f"\nTrainer step: BERT {r['params'] / 1e6:.1f}M params, median step of {r['repeats']} x {r['steps']} steps"
        )
        print(f"{'optim':<22}{'ms/step':>10}{'vs fused':>10}")
        for name, row in r["rows"].items():
            print(f"{name:<22}{row['ms_per_step']:>10.1f}{row['ratio']:>9.3f}x")
    if "optimizer_step" in results:
        print("\noptimizer.step() alone (optimizers built by Trainer, same gradients)")
        print(f"{'optim':<22}{'ms/step':>10}{'vs fused':>10}")
        for name, row in results["optimizer_step"].items():
            print(f"{name:<22}{row['ms']:>10.2f}{row['ratio']:>9.3f}x")
    if "save" in results:
        r = results["save"]
        print(f"\nCheckpoint save ({r['optimizer_state_mb']:.0f} MB optimizer state)")
        print(f"{'part':<22}{'trainer':<24}{'ms':>8}{'vs stock':>10}")
        for part, rows in r["parts"].items():
            for name, row in rows.items():
                print(f"{part:<22}{name:<24}{row['ms']:>8.1f}{row['ratio']:>9.3f}x")
    if "startup" in results:
        r = results["startup"]
        if r["installed"]:
            print(
                f"\nStart-up hook (_hf_optim_autoload, -X importtime): median {r['ms_median']:.2f} ms, "
                f"max {r['ms_max']:.2f} ms over {r['runs']} runs"
            )
        else:
            print(
                "\nStart-up hook not installed (pip install -e . puts hf_optim_autoload.pth in site-packages)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
