"""Item-normalised gradient accumulation with Accelerate, across micro-batches and processes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from hf_optim._utils import parameters_of

__all__ = ["ItemNormalizer"]

_NO_GRADIENT_ACCESS = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


class ItemNormalizer:
    """Item-normalised loss for gradient accumulation with Accelerate, across micro-batches AND processes.

    Averaging a per-micro-batch *mean* loss over-weights the items of short micro-batches (the 2024 gradient
    accumulation bug); averaging over processes does the same across processes. The update should instead use
    ``sum of every item's loss / number of items`` over the whole accumulation window of every process.

    Call :meth:`backward` with the loss *summed* over the items of the micro-batch and their count, inside
    ``accelerator.accumulate(model)``, in place of ``accelerator.backward(loss)``. Gradients accumulate as sums
    (Accelerate's division by ``gradient_accumulation_steps`` and DDP's average over processes are undone);
    on the micro-step that synchronises gradients, the item counts of all processes are summed with one
    all-reduce and the gradients are divided by that total, before your ``clip_grad_norm_`` / ``optimizer.step()``.
    No batch has to be read ahead, so the last, shorter window of an epoch is handled as Accelerate syncs it.

    After each synchronising step :attr:`loss` is the mean loss per item over the window (all processes) and
    :attr:`num_items` the number of items: log those. Not supported under DeepSpeed / Megatron-LM, whose
    engines own the gradients.

    Args:
        accelerator: The run's ``Accelerator`` (its ``gradient_accumulation_steps`` sets the window).
        model_or_params: The prepared model, or its parameters.

    Raises:
        NotImplementedError: Under DeepSpeed or Megatron-LM.
        ValueError: If there is no parameter with ``requires_grad=True``.

    Example:
        ```python
        import torch
        from accelerate import Accelerator
        import hf_optim

        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
        normalizer = hf_optim.ItemNormalizer(accelerator, model)
        for n in (1, 3):  # micro-batches of 1 and 3 items, each with target 1
            with accelerator.accumulate(model):
                x = torch.ones(n, 1)
                loss_sum = ((model(x) - 1) ** 2).sum()
                normalizer.backward(loss_sum, num_items=n)
        assert normalizer.num_items == 4 and normalizer.loss == 1.0
        assert torch.allclose(model.weight.grad, torch.tensor([[-2.0]]))  # d/dw of the mean over all 4 items
        ```
    """

    def __init__(self, accelerator: Accelerator, model_or_params: torch.nn.Module | Iterable[Any]) -> None:
        if accelerator.distributed_type in _NO_GRADIENT_ACCESS:
            raise NotImplementedError(
                f"ItemNormalizer needs access to the gradients, which {accelerator.distributed_type} keeps inside its "
                "engine; pass num_items_in_batch to the model's loss instead"
            )
        self.accelerator = accelerator
        # Each parameter once: a gradient listed twice must not be scaled twice.
        self._params = list(
            {id(p): p for p in parameters_of(model_or_params, "model_or_params") if p.requires_grad}.values()
        )
        if not self._params:
            raise ValueError(
                "model_or_params: expected a model or parameters with requires_grad=True, got none"
            )
        self._window: torch.Tensor | None = None  # [loss sum, item count] of this process's current window
        self.loss: float | None = None
        self.num_items: int | None = None

    def backward(self, loss_sum: torch.Tensor, num_items: int | torch.Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss_sum`` (summed over ``num_items`` items); normalise when gradients synchronise.

        ``kwargs`` go to ``accelerator.backward``.
        """
        if not isinstance(loss_sum, torch.Tensor) or loss_sum.numel() != 1:
            raise ValueError(
                f"loss_sum must be a scalar tensor (the loss summed over items), got {loss_sum!r}"
            )
        count = _item_count(num_items)
        self.accelerator.backward(loss_sum, **kwargs)
        device = self.accelerator.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        entry = torch.stack([loss_sum.detach().reshape(()).to(device, dtype), count.to(device, dtype)])
        self._window = entry if self._window is None else self._window + entry
        if self.accelerator.sync_gradients:
            self._normalise()

    def _normalise(self) -> None:
        totals = self.accelerator.reduce(self._window, reduction="sum")
        self._window = None
        loss_total, items = totals.tolist()
        self.num_items = round(items)
        self.loss = loss_total / items if items > 0 else float("nan")
        # accelerator.backward divided each micro-batch by gradient_accumulation_steps and DDP averaged over
        # num_processes: undo both, then divide by the global item count (0 items leave zero gradients).
        scale = (
            self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes / max(items, 1.0)
        )
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)


def _item_count(num_items: int | torch.Tensor) -> torch.Tensor:
    if isinstance(num_items, torch.Tensor):
        # No value check on tensors: reading one would synchronise with the device at every micro-step.
        if (
            num_items.numel() != 1
            or num_items.is_floating_point()
            or num_items.is_complex()
            or num_items.dtype == torch.bool
        ):
            raise ValueError(
                f"num_items must be a scalar integer tensor (a count of items), got {num_items!r}"
            )
        return num_items.detach().reshape(())
    if isinstance(num_items, int) and not isinstance(num_items, bool):
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        return torch.tensor(num_items)
    raise TypeError(f"num_items must be an int or a scalar integer tensor, got {num_items!r}")
