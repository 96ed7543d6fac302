#!/usr/bin/env python
"""Train a small GPT-2 with DeepSpeed ZeRO (stage 1, 2 or 3) and an hf_optim client optimizer; save its state
in safetensors (each process its own partition), resume on any number of processes, any stage.

    torchrun --standalone --nproc_per_node 2 scripts/train_deepspeed.py --output_dir out --zero_stage 2 \\
        --max_steps 20 --save_steps 10
    torchrun --standalone --nproc_per_node 3 scripts/train_deepspeed.py --output_dir out3 --zero_stage 3 \\
        --max_steps 20 --resume_from_checkpoint out/checkpoint-10      # or hf://user/repo/checkpoint-10

Runs on CPU (``DS_ACCELERATOR=cpu``, gloo) with ``gradient_clipping: 0`` (DeepSpeed's default is 1.0, where
torch clips nothing). Every ``--save_steps`` it writes ``checkpoint-N/`` with the model weights
(``model.safetensors``, gathered on rank 0), the optimizer and scheduler state (``hf_optim.save_state(...,
model=engine)``) and ``step.json``. The global batch is the same whatever the number of processes, so runs on
1, 2 or 3 processes and any ZeRO stage follow the same trajectory (up to float32 rounding of the gradient
reductions). At the end rank 0 prints the loss and the weights' checksum.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import hf_optim


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--zero_stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 master weights (saved too)")
    p.add_argument("--optim", default="adamw_hf", help="hf_optim optimizer name (hf-optim list)")
    p.add_argument("--lr_scheduler_type", default="linear", help="hf_optim schedule name")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--save_steps", type=int, default=10, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder or an hf:// URL")
    p.add_argument("--global_batch_size", type=int, default=12, help="split evenly over the processes")
    p.add_argument("--seq_len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: resumed runs follow the same trajectory
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def batch(step: int, rank: int, world: int, args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randint(0, 64, (args.global_batch_size, args.seq_len), generator=g)
    per = args.global_batch_size // world
    return tokens[rank * per : (rank + 1) * per]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:  # plain `python`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    engine = optimizer = None
    try:
        engine, optimizer = train(args)
    finally:
        # explicit teardown: the engine and its optimizer hold the process group; with them released, gloo is
        # torn down here, after a barrier, rather than while the interpreter exits (which may abort)
        del engine, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def train(args: argparse.Namespace) -> tuple[object, object]:
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch_size % world:
        raise SystemExit(f"--global_batch_size {args.global_batch_size} must divide by {world} processes")
    os.makedirs(args.output_dir, exist_ok=True)
    model = build_model(args.seed)
    start = 0
    resume = args.resume_from_checkpoint
    if resume is not None:
        resume = local_checkpoint(resume)
        model.load_state_dict(load_file(os.path.join(resume, "model.safetensors")))
        with open(os.path.join(resume, "step.json")) as f:
            start = int(json.load(f)["step"])
    optimizer = hf_optim.create_optimizer(
        args.optim, model, lr=args.learning_rate, weight_decay=args.weight_decay
    )
    scheduler = hf_optim.get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=args.max_steps,
    )
    config = {
        "train_batch_size": args.global_batch_size,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.bf16},
    }
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if resume is not None:
        hf_optim.load_state(resume, zero_optimizer, scheduler, model=engine)
        if rank == 0:
            print(f"resumed from {args.resume_from_checkpoint} at step {start} on {world} process(es), "
                  f"ZeRO-{args.zero_stage}", flush=True)  # fmt: skip

    began = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for step in range(start, args.max_steps):
        ids = batch(step, rank, world, args)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        scheduler.step()
        loss = loss.detach().float()
        dist.all_reduce(loss)  # the loss of the global batch, whatever the number of processes
        loss /= world
        if rank == 0:
            print(f"step {step + 1}/{args.max_steps} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.3e}",
                  flush=True)  # fmt: skip
        if args.save_steps and (step + 1) % args.save_steps == 0:
            save_checkpoint(engine, zero_optimizer, scheduler, step + 1, args, rank)
    weights = full_weights(engine)
    if rank == 0:
        save_file(weights, os.path.join(args.output_dir, "final_model.safetensors"))
        checksum = sum(float(t.double().sum()) for t in weights.values())
        print(
            f"done: {args.max_steps - start} steps in {time.perf_counter() - began:.1f}s on {world} process(es), "
            f"ZeRO-{args.zero_stage}; final loss {loss.item():.4f}; weights checksum {checksum:.6f}",
            flush=True,
        )
    return engine, zero_optimizer


def local_checkpoint(path_or_url: str) -> str:
    """A local folder for a checkpoint: an ``hf://`` URL is downloaded once per machine (local rank 0 fetches,
    the other processes wait, then read the same cache)."""
    if not path_or_url.startswith("hf://"):
        return path_or_url
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        path = hf_optim.download_checkpoint(path_or_url)
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        path = hf_optim.download_checkpoint(path_or_url, local_files_only=True)
    return path


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU in float32 (gathered from the partitions under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {k: v.detach().float().clone().contiguous() for k, v in engine.module.state_dict().items()}


def save_checkpoint(engine, optimizer, scheduler, step: int, args: argparse.Namespace, rank: int) -> None:
    directory = os.path.join(args.output_dir, f"checkpoint-{step}")
    weights = full_weights(engine)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        save_file(weights, os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "step.json"), "w") as f:
            json.dump({"step": step}, f)
    hf_optim.save_state(directory, optimizer, scheduler, model=engine)  # every process writes its partition
    if rank == 0:
        print(f"saved {directory}", flush=True)


if __name__ == "__main__":
    main()
