"""``use_safetensors_state``: an accelerator whose own ``save_state()`` / ``load_state()`` write and read
hf_optim's format (:func:`~hf_optim.integrations.accelerate.checkpoint.accelerate_save_state` /
:func:`~hf_optim.integrations.accelerate.checkpoint.accelerate_load_state`)."""

from __future__ import annotations

import os
import re
from typing import Any

from accelerate import Accelerator

from hf_optim.integrations.accelerate.checkpoint import (
    accelerate_load_state,
    accelerate_save_state,
    check_checkpoint_support,
)

__all__ = ["use_safetensors_state"]


def use_safetensors_state(accelerator: Accelerator) -> Accelerator:
    """Make this accelerator's own ``save_state()`` / ``load_state()`` write and read hf_optim's format.

    After this call ``accelerator.save_state(output_dir)`` is :func:`accelerate_save_state` and
    ``accelerator.load_state(input_dir)`` is :func:`accelerate_load_state`: no ``optimizer.bin``,
    ``scheduler.bin`` or ``custom_checkpoint_N.pkl``. Automatic checkpoint naming and ``total_limit`` work as
    in Accelerate (its own code runs them). Only this instance changes.

    Args:
        accelerator: The ``Accelerator`` whose ``save_state`` / ``load_state`` change.

    Returns:
        The same ``accelerator``, for chaining.

    Raises:
        TypeError: From the replaced methods, given DeepSpeed / Megatron-LM or model loading arguments.

    Example:
        ```python
        import os
        import torch
        from accelerate import Accelerator
        import hf_optim

        accelerator = hf_optim.use_safetensors_state(Accelerator(cpu=True))
        model = torch.nn.Linear(2, 2)
        model, optimizer = accelerator.prepare(model, hf_optim.AdamW(model.parameters()))
        accelerator.save_state("ckpt")
        assert hf_optim.has_state("ckpt") and not os.path.exists("ckpt/optimizer.bin")
        ```
    """
    check_checkpoint_support(accelerator, "use_safetensors_state")
    if getattr(accelerator, "_hf_optim_safetensors_state", False):
        return accelerator

    def save_state(
        output_dir: str | os.PathLike[str] | None = None,
        safe_serialization: bool = True,
        **save_model_func_kwargs: Any,
    ) -> str:
        if save_model_func_kwargs:
            raise TypeError(
                f"save_state() got {sorted(save_model_func_kwargs)}: those are arguments of DeepSpeed's / "
                "Megatron-LM's own checkpoints, which hf_optim's checkpoints replace"
            )
        return accelerate_save_state(accelerator, output_dir, safe_serialization=safe_serialization)

    def load_state(
        input_dir: str | os.PathLike[str] | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        if load_kwargs or kwargs:
            raise TypeError(
                "load_state(): load_kwargs and model loading arguments do not apply to hf_optim's checkpoints "
                "(safetensors files, read by hf_optim)"
            )
        if input_dir is None:
            input_dir = _latest_automatic_checkpoint(accelerator)
        return accelerate_load_state(accelerator, input_dir)

    save_state.__doc__ = accelerate_save_state.__doc__
    load_state.__doc__ = accelerate_load_state.__doc__
    accelerator.save_state = save_state
    accelerator.load_state = load_state
    accelerator._hf_optim_safetensors_state = True
    return accelerator


def _latest_automatic_checkpoint(accelerator: Accelerator) -> str:
    """The folder ``Accelerator.load_state(None)`` picks: the highest trailing number in ``project_dir/checkpoints``."""
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
    root = os.path.join(accelerator.project_dir, "checkpoints")
    numbered = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = re.search(r"([0-9]+)[^/]*$", name)
        if match:
            numbered.append((int(match.group(1)), name))
    if not numbered:
        raise FileNotFoundError(f"no checkpoint folder in {root!r}")
    return os.path.join(root, max(numbered)[1])
