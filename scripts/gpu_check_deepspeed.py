#!/usr/bin/env python
"""One run of the GPU-only DeepSpeed check that ``scripts/gpu_check.sh`` drives: ``hf_optim.Trainer`` under
DeepSpeed ZeRO-2 on 2 GPUs writes hf_optim's safetensors optimizer state (no ``global_stepN/`` pickles) and
resumes from it.

    torchrun --nproc_per_node 2 scripts/gpu_check_deepspeed.py OUT {full|first|resume} [ZERO_STAGE [REPO_ID]]

``full`` trains 8 steps (saving every 4), ``first`` trains 4 and saves, ``resume`` loads checkpoint 4 of either
and trains the rest; each writes its final weights (rank 0) to ``OUT/deepspeed_<mode>.safetensors``. On a
CPU-only machine Accelerate counts one process while DeepSpeed runs several (its batch-size check fails):
``tests/deepspeed/test_trainer_zero.py`` runs it there through a patch of Accelerate's backend choice
(``tests/deepspeed/cpu_launch.py``). With ``REPO_ID`` the checkpoints are pushed there
(``hub_strategy="all_checkpoints"``) and ``resume`` starts from ``hf://REPO_ID/checkpoint-4``.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

import hf_optim

STEPS, SAVE_AT = 8, 4


def main(out: str, mode: str, stage: int, repo_id: str | None = None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

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

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32))
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    args = TrainingArguments(
        output_dir=os.path.join(out, "deepspeed"),
        optim="adamw_hf",
        learning_rate=1e-3,
        max_grad_norm=0.0,  # unclipped (DeepSpeed clips at 1.0 by default)
        lr_scheduler_type="linear",
        warmup_steps=2,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        deepspeed=deepspeed,
        push_to_hub=repo_id is not None and mode != "resume",
        hub_model_id=repo_id,
        hub_strategy="all_checkpoints",
    )
    trainer = hf_optim.Trainer(model=model, args=args, train_dataset=Tokens())
    if mode == "first":
        trainer.add_callback(StopAt())
        trainer.train()
        checkpoint = os.path.join(out, "deepspeed", f"checkpoint-{SAVE_AT}")
        assert os.path.isfile(os.path.join(checkpoint, "optimizer.sharded.json")), os.listdir(checkpoint)
        assert not [n for n in os.listdir(checkpoint) if n.startswith("global_step")], os.listdir(checkpoint)
    elif mode == "resume":
        local = os.path.join(out, "deepspeed", f"checkpoint-{SAVE_AT}")
        trainer.train(resume_from_checkpoint=f"hf://{repo_id}/checkpoint-{SAVE_AT}" if repo_id else local)
    else:
        trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        save_file(
            {k: v.detach().float().cpu().clone() for k, v in state.items()},
            os.path.join(out, f"deepspeed_{mode}.safetensors"),
        )
    trainer.accelerator.free_memory()  # destroys the DeepSpeed engine, which holds the process group


def end_process_group() -> None:
    """Tear the process group down while every process waits, once nothing holds it (see the README's
    Accelerate section): left to interpreter exit, gloo can abort or hang."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2, *sys.argv[4:5])
    end_process_group()  # main's trainer and engine are gone with its frame
