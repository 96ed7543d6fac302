"""One run of Accelerate + DeepSpeed ZeRO with ``hf_optim.use_safetensors_state``
(tests/deepspeed/test_accelerate_zero.py).

    torchrun --nproc_per_node N tests/deepspeed/cpu_launch.py tests/deepspeed/accelerate_zero_job.py \
        OUT {train|resume} STAGE CHECKPOINT

``train`` runs 8 steps, saving with ``accelerator.save_state(CHECKPOINT)`` after step 4; ``resume`` loads
CHECKPOINT with ``accelerator.load_state`` and runs steps 5-8. Both write the final weights (rank 0) to
``OUT/<mode>-zero<STAGE>-<N>.safetensors``. The global batch is the same on any number of processes.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from safetensors.torch import save_file

import hf_optim

GLOBAL_BATCH, STEPS, SAVE_AFTER = 8, 8, 4


def main(out: str, mode: str, stage: int, checkpoint: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    hf_optim.use_safetensors_state(accelerator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = hf_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    data = torch.randn(STEPS * GLOBAL_BATCH, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randn(STEPS * GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(2))
    first = 0
    if mode == "resume":
        accelerator.load_state(checkpoint)
        first = SAVE_AFTER
    micro = GLOBAL_BATCH // world
    for step in range(first, STEPS):
        rows = slice(
            step * GLOBAL_BATCH + accelerator.process_index * micro,
            step * GLOBAL_BATCH + (accelerator.process_index + 1) * micro,
        )
        loss = torch.nn.functional.mse_loss(model(data[rows]), target[rows])
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if mode == "train" and step + 1 == SAVE_AFTER:
            accelerator.save_state(checkpoint)
    weights = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tensors = {k: v.detach().float().cpu().clone() for k, v in weights.items()}
        save_file(tensors, os.path.join(out, f"{mode}-zero{stage}-{world}.safetensors"))
    accelerator.free_memory()  # destroys the DeepSpeed engine, which holds the process group


def end_process_group() -> None:
    """Tear the process group down while every process waits, once nothing holds it."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
    end_process_group()
