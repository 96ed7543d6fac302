#!/usr/bin/env python
"""One run of the GPU-only FSDP2 checks that ``scripts/gpu_check.sh`` drives (Accelerate and Trainer).

    accelerate launch --config_file fsdp2.yaml scripts/gpu_check_fsdp.py accelerate OUT {full|first|resume}
    accelerate launch --config_file fsdp2.yaml scripts/gpu_check_fsdp.py trainer OUT {full|first|resume}

``full`` trains 8 steps without interruption, ``first`` trains 4 (Accelerate: and half of the 5th step's
accumulation window) and saves, ``resume`` loads that checkpoint and trains the rest. Each run writes its final weights (rank 0) to ``OUT/<mode>.safetensors``; the shell script
compares ``full`` with ``resume``. Accelerate enables FSDP only on GPUs, so this cannot run on CPU machines.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

import hf_optim

STEPS, SAVE_AT = 8, 4


def build_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32))


def batch(step: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 128, (4 * world, 16), generator=g)
    return tokens[rank * 4 : (rank + 1) * 4].to(device)


def full_weights(accelerator, model) -> dict[str, torch.Tensor]:
    state = accelerator.get_state_dict(model)  # gathered on the main process
    return {k: v.detach().float().cpu().clone() for k, v in (state or {}).items()}  # tied weights: copies


def run_accelerate(out: str, mode: str) -> None:
    """Two micro-batches per step through a GradientAccumulator; ``first`` saves in the middle of step SAVE_AT's
    window (one micro-batch accumulated), so the accumulator's sharded gradients must resume too."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = build_model()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-3, weight_decay=0.01)
    scheduler = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    model, optimizer, scheduler = hf_optim.accelerate_prepare(accelerator, model, optimizer, scheduler)
    accumulator = hf_optim.GradientAccumulator()
    start = 0
    if mode == "resume":
        hf_optim.accelerate_load_state(
            accelerator, os.path.join(out, "accelerate_ckpt"), accumulator=accumulator
        )
        start = 2 * SAVE_AT + 1
    end = 2 * SAVE_AT + 1 if mode == "first" else 2 * STEPS
    for micro in range(start, end):
        ids = batch(1000 + micro, accelerator.process_index, accelerator.num_processes, accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        accumulator.accumulate_from(model)
        if micro % 2 == 1:
            accumulator.apply_to(model)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    if mode == "first":
        hf_optim.accelerate_save_state(
            accelerator, os.path.join(out, "accelerate_ckpt"), accumulator=accumulator
        )
    weights = full_weights(accelerator, model)
    if accelerator.is_main_process:
        save_file(weights, os.path.join(out, f"accelerate_{mode}.safetensors"))


def run_trainer(out: str, mode: str) -> None:
    from transformers import TrainerCallback, TrainingArguments

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= SAVE_AT:
                control.should_training_stop = True
            return control

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        optim="adamw_hf",
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        save_steps=SAVE_AT,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True},
    )
    trainer = hf_optim.Trainer(model=build_model(), args=args, train_dataset=Tokens())
    if mode == "first":
        trainer.add_callback(StopAt())  # same schedule as the full run; stop after the checkpoint at SAVE_AT
        trainer.train()
    elif mode == "resume":
        trainer.train(resume_from_checkpoint=os.path.join(out, "trainer", f"checkpoint-{SAVE_AT}"))
    else:
        trainer.train()
    weights = full_weights(trainer.accelerator, trainer.model)
    if trainer.accelerator.is_main_process:
        save_file(weights, os.path.join(out, f"trainer_{mode}.safetensors"))


if __name__ == "__main__":
    kind, out, mode = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    {"accelerate": run_accelerate, "trainer": run_trainer}[kind](out, mode)
