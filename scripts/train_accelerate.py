#!/usr/bin/env python
"""A plain Accelerate training loop (no Trainer) using hf_optim by name, with item-normalised gradient
accumulation and safetensors checkpoints that resume on any number of processes, locally or from the Hub.

One process::

    python scripts/train_accelerate.py --cpu --output_dir out --max_steps 100 --save_steps 50

Two CPU processes (DDP over gloo; ``--cpu`` is required, see the README)::

    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 scripts/train_accelerate.py --cpu \\
        --output_dir out --max_steps 100 --gradient_accumulation_steps 2 --per_device_train_batch_size 4

The task is synthetic so the script runs anywhere: variable-length token sequences (so micro-batches hold
unequal numbers of items) following a fixed rule that a tiny model learns. Checkpoints go to
``OUTPUT_DIR/checkpoint-STEP`` every ``--save_steps`` optimizer steps (pushed to ``checkpoint-STEP/`` of
``--push_to_hub_repo`` if given); the final weights to ``OUTPUT_DIR/model.safetensors``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import hf_optim

logger = logging.getLogger("train_accelerate")

TRAIN_STATE_NAME = "train_state.json"  # written into every checkpoint: the optimizer step it was taken at
RESULTS_NAME = "train_results.json"  # written into OUTPUT_DIR at the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--optim", default="adamw_hf", help="hf_optim optimizer name (hf-optim list)")
    # Schedule arguments default to None ("not given"): on resume they come from the checkpoint's scheduler.json.
    p.add_argument(
        "--lr_scheduler_type",
        default=None,
        help="hf_optim schedule name (hf-optim list); default: linear, or the checkpoint's when resuming",
    )
    p.add_argument(
        "--lr_scheduler_kwargs",
        type=json.loads,
        default=None,
        help="extra schedule arguments as JSON, e.g. '{\"min_lr\": 1e-5}'; default: none, or the checkpoint's",
    )
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument(
        "--num_warmup_steps", type=int, default=None, help="default: 0, or the checkpoint's when resuming"
    )
    p.add_argument(
        "--num_training_steps",
        type=int,
        default=None,
        help="length of the schedule in optimizer steps; default: --max_steps, or the checkpoint's when resuming",
    )
    p.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="number of optimizer steps; default: 20, or the checkpoint's num_training_steps when resuming",
    )
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--save_steps", type=int, default=0, help="checkpoint every N optimizer steps (0: never)")
    p.add_argument(
        "--resume_from", default=None, help="checkpoint folder, Hub repo id or hf://USER/REPO[@REV]/SUBFOLDER"
    )
    p.add_argument(
        "--push_to_hub_repo", default=None, help="push each checkpoint to checkpoint-STEP/ of this repo"
    )
    p.add_argument("--cpu", action="store_true", help="train on CPU (needed for multi-process CPU runs)")
    p.add_argument("--logging_steps", type=int, default=1)
    # the synthetic task
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=32)
    p.add_argument("--hidden_size", type=int, default=32)
    args = p.parse_args(argv)
    for name in (
        "gradient_accumulation_steps",
        "per_device_train_batch_size",
        "logging_steps",
        "num_samples",
        "vocab_size",
        "hidden_size",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "num_training_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("save_steps", "num_warmup_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr_scheduler_kwargs is not None and not isinstance(args.lr_scheduler_kwargs, dict):
        p.error(f"--lr_scheduler_kwargs must be a JSON object, got {args.lr_scheduler_kwargs!r}")
    if args.seq_len < 2:
        p.error(f"--seq_len must be >= 2, got {args.seq_len}")
    return args


# ---------------------------------------------------------------------------------------------------------
# The synthetic task (importable: the tests rebuild the same model and data for their reference runs)
# ---------------------------------------------------------------------------------------------------------


def build_dataset(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> TensorDataset:
    """Sequences of 2..seq_len tokens where token t+1 = (3 * t + 1) mod vocab_size; padding is labelled -100."""
    g = torch.Generator().manual_seed(10_000 + seed)
    lengths = torch.randint(2, seq_len + 1, (num_samples,), generator=g)
    chain = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
    chain[:, 0] = torch.randint(0, vocab_size, (num_samples,), generator=g)
    for t in range(seq_len):
        chain[:, t + 1] = (3 * chain[:, t] + 1) % vocab_size
    valid = torch.arange(seq_len)[None, :] < lengths[:, None]
    input_ids = torch.where(valid, chain[:, :-1], torch.zeros_like(chain[:, :-1]))
    labels = torch.where(valid, chain[:, 1:], torch.full_like(chain[:, 1:], -100))
    return TensorDataset(input_ids, labels)


class TinyLM(nn.Module):
    """Embedding, a residual MLP, LayerNorm and an output head: weights, biases and norm weights to decay or not."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x + self.mlp(x)
        return self.lm_head(self.norm(x))


def build_model(vocab_size: int, hidden_size: int, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(vocab_size, hidden_size)


def loss_sum_and_items(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the labelled tokens of the batch, and their number."""
    input_ids, labels = batch
    logits = model(input_ids)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _read_start_step(checkpoint_dir: str) -> int:
    path = os.path.join(checkpoint_dir, TRAIN_STATE_NAME)
    try:
        with open(path) as f:
            step = json.load(f)["global_step"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--resume_from: cannot read the step from {path!r}: {err}") from None
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"--resume_from: {path!r} has global_step={step!r}, expected an int >= 0")
    return step


def _saved_schedule(checkpoint_dir: str) -> tuple[str, dict[str, Any]]:
    """The schedule name and arguments recorded in a checkpoint's ``scheduler.json``."""
    path = os.path.join(checkpoint_dir, hf_optim.SCHEDULER_NAME)
    try:
        with open(path) as f:
            doc = json.load(f)
        name, kwargs = doc["name"], doc["kwargs"]["dict"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume_from: cannot read the schedule from {path!r}: {err}") from None
    plain = (str, int, float, bool, type(None))
    if (
        not isinstance(name, str)
        or not isinstance(kwargs, dict)
        or not all(isinstance(v, plain) for v in kwargs.values())
    ):
        raise ValueError(
            f"--resume_from: {path!r} records no hf_optim schedule with plain arguments; pass --lr_scheduler_type, "
            "--num_warmup_steps, --num_training_steps and --lr_scheduler_kwargs explicitly"
        )
    return name, kwargs


def resolve_schedule_args(args: argparse.Namespace, checkpoint_dir: str | None) -> None:
    """Fill the schedule arguments not given on the command line: from the checkpoint when resuming (so the
    resumed run follows the same schedule), else the defaults."""
    saved_name, saved = _saved_schedule(checkpoint_dir) if checkpoint_dir else ("linear", {})
    saved = dict(saved)
    if args.lr_scheduler_type is None:
        args.lr_scheduler_type = saved_name
    elif args.lr_scheduler_type != saved_name:
        saved = {}  # another schedule: the recorded arguments belong to the old one
    if args.num_warmup_steps is None:
        args.num_warmup_steps = saved.get("num_warmup_steps") or 0
    if args.max_steps is None:
        args.max_steps = args.num_training_steps or saved.get("num_training_steps") or 20
    if args.num_training_steps is None:
        args.num_training_steps = saved.get("num_training_steps") or args.max_steps
    if args.lr_scheduler_kwargs is None:
        args.lr_scheduler_kwargs = {
            k: v for k, v in saved.items() if k not in ("num_warmup_steps", "num_training_steps")
        }


def train(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """Train (resuming if asked) and save; returns plain numbers, so nothing prepared outlives the call."""
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(name)s: %(message)s",
        force=True,
    )
    # the root logger at INFO would also show Accelerate's notes and the Hub client's line per HTTP request,
    # interleaved with the progress bar
    for noisy in ("accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"world_size={accelerator.num_processes} rank={accelerator.process_index}", flush=True)
    set_seed(args.seed)
    checkpoint_dir = None
    if args.resume_from:
        with accelerator.local_main_process_first():  # the state files only; the rest is fetched below
            checkpoint_dir = hf_optim.resolve_state_dir(args.resume_from)
    resolve_schedule_args(args, checkpoint_dir)
    logger.info(
        "schedule %s: num_warmup_steps=%s num_training_steps=%s %s",
        args.lr_scheduler_type,
        args.num_warmup_steps,
        args.num_training_steps,
        args.lr_scheduler_kwargs,
    )

    model = build_model(args.vocab_size, args.hidden_size, args.seed)
    dataset = build_dataset(args.num_samples, args.seq_len, args.vocab_size, args.seed)
    loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=False)
    optimizer = hf_optim.create_optimizer(
        args.optim, model, lr=args.learning_rate, weight_decay=args.weight_decay
    )
    scheduler = hf_optim.create_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.num_training_steps,
        **args.lr_scheduler_kwargs,
    )
    # accelerate_prepare: the hf_optim schedule advances once per optimizer step on any number of processes.
    model, optimizer, loader, scheduler = hf_optim.accelerate_prepare(
        accelerator, model, optimizer, loader, scheduler
    )
    normalizer = hf_optim.ItemNormalizer(accelerator, model)

    global_step = 0
    if args.resume_from:
        checkpoint_dir = hf_optim.accelerate_load_state(accelerator, args.resume_from)
        global_step = _read_start_step(checkpoint_dir)
        logger.info("resumed from %s at step %d", args.resume_from, global_step)

    if args.push_to_hub_repo and accelerator.is_main_process:
        from huggingface_hub import HfApi

        HfApi().create_repo(args.push_to_hub_repo, exist_ok=True)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    epoch, skip = divmod(global_step, steps_per_epoch)
    skip *= args.gradient_accumulation_steps  # checkpoints are taken at window boundaries
    progress = tqdm(
        total=args.max_steps,
        initial=global_step,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    model.train()
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        while global_step < args.max_steps:
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for batch in epoch_loader:
                with accelerator.accumulate(model):
                    loss_sum, num_items = loss_sum_and_items(model, batch)
                    normalizer.backward(loss_sum, num_items)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                if global_step % args.logging_steps == 0:
                    lr = scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{normalizer.loss:.4f}", lr=f"{lr:.3g}")
                    logger.info(
                        "step=%d epoch=%d loss=%.6f items=%d lr=%.6g",
                        global_step,
                        epoch,
                        normalizer.loss,
                        normalizer.num_items,
                        lr,
                    )
                if args.save_steps and global_step % args.save_steps == 0:
                    _save_checkpoint(accelerator, args, global_step)
                if global_step >= args.max_steps:
                    break
            epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    accelerator.save_model(
        model, args.output_dir
    )  # OUTPUT_DIR/model.safetensors, written by the main process
    results = {
        "world_size": accelerator.num_processes,
        "global_step": global_step,
        "scheduler_last_epoch": scheduler.scheduler.last_epoch,
        "lr": scheduler.get_last_lr()[0],
        "loss": normalizer.loss,
    }
    if accelerator.is_main_process:
        _write_json(os.path.join(args.output_dir, RESULTS_NAME), results)
        if args.push_to_hub_repo:
            from huggingface_hub import HfApi

            HfApi().upload_file(
                path_or_fileobj=os.path.join(args.output_dir, "model.safetensors"),
                path_in_repo="model.safetensors",
                repo_id=args.push_to_hub_repo,
                commit_message=f"Final model after {global_step} steps",
            )
    return results


def end_training(accelerator: Accelerator) -> None:
    """Release everything that holds the process group, then destroy the group while every process waits.

    The prepared model (its DDP reducer), optimizer, scheduler and dataloaders each keep a reference to the gloo
    process group. Whichever drops the last one runs the group's destructor, which joins gloo's threads: done by
    interpreter teardown after ``end_training``, it can wait forever. So: drop them, collect, meet, destroy.
    """
    accelerator.free_memory()  # the references Accelerate keeps to what it prepared
    gc.collect()  # and any cycle still holding them
    accelerator.wait_for_everyone()  # no process tears gloo down while another still talks to it
    accelerator.end_training()  # destroys the process group


def _save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int) -> None:
    checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{step}")
    hf_optim.accelerate_save_state(accelerator, checkpoint_dir)
    if accelerator.is_main_process:
        _write_json(os.path.join(checkpoint_dir, TRAIN_STATE_NAME), {"global_step": step})
        logger.info("saved %s", checkpoint_dir)
        if args.push_to_hub_repo:
            from huggingface_hub import HfApi

            HfApi().upload_folder(
                repo_id=args.push_to_hub_repo,
                folder_path=checkpoint_dir,
                path_in_repo=f"checkpoint-{step}",
                commit_message=f"Training checkpoint {step}",
            )
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.gradient_accumulation_steps)
    try:
        train(args, accelerator)
    except BaseException as err:
        # The failed call's frames still hold the prepared objects: clear them so the group can go first.
        traceback.clear_frames(err.__traceback__)
        accelerator.free_memory()
        gc.collect()
        accelerator.state.destroy_process_group()  # no barrier: the other processes may never reach one
        raise
    end_training(accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
