"""Accelerate integration: prepared schedules counted in optimizer steps, item-normalised gradient
accumulation across micro-batches and processes, and checkpoints whose optimizer / scheduler / accumulator /
registered-object state is stored in hf_optim's safetensors + JSON format instead of Accelerate's pickles.

Everything here works with a plain Accelerate loop::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    hf_optim.use_safetensors_state(accelerator)  # accelerator.save_state() / load_state() in hf_optim's format
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=3e-4, weight_decay=0.01)
    scheduler = hf_optim.create_scheduler("linear", optimizer, num_warmup_steps=100, num_training_steps=1000)
    model, optimizer, loader, scheduler = hf_optim.accelerate_prepare(accelerator, model, optimizer, loader, scheduler)
    normalizer = hf_optim.ItemNormalizer(accelerator, model)
    for batch in loader:
        with accelerator.accumulate(model):
            loss_sum, num_items = ...  # loss summed (not averaged) over the items of this micro-batch
            normalizer.backward(loss_sum, num_items)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

Modules: :mod:`.prepare` (``accelerate_prepare``, ``step_once_per_optimizer_step``), :mod:`.normalizer`
(``ItemNormalizer``), :mod:`.checkpoint` (``accelerate_save_state``, ``accelerate_load_state``),
:mod:`.safetensors_state` (``use_safetensors_state``).
"""

from hf_optim.integrations.accelerate.checkpoint import accelerate_load_state, accelerate_save_state
from hf_optim.integrations.accelerate.normalizer import ItemNormalizer
from hf_optim.integrations.accelerate.prepare import accelerate_prepare, step_once_per_optimizer_step
from hf_optim.integrations.accelerate.safetensors_state import use_safetensors_state

__all__ = [
    "ItemNormalizer",
    "accelerate_load_state",
    "accelerate_prepare",
    "accelerate_save_state",
    "step_once_per_optimizer_step",
    "use_safetensors_state",
]
