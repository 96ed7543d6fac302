"""Gradient accumulation: a PyTorch port of transformers 4.x TF ``GradientAccumulator`` plus item normalisation.

The TF API is kept: ``acc(gradients)`` adds a list of gradients, ``acc.step`` counts the calls,
``acc.gradients`` holds the sums and ``acc.reset()`` zeroes them. As in the original, accumulation is local to the
process (no communication). PyTorch conveniences: :meth:`GradientAccumulator.accumulate_from` reads (and clears)
the parameters' ``.grad`` and :meth:`GradientAccumulator.apply_to` writes the result back for ``optimizer.step()``,
divided by the number of micro-steps or by the number of items (tokens) seen.

Normalising by items is what makes accumulation exact when micro-batches have unequal token counts (the 2024
gradient-accumulation bug: averaging per-micro-batch *means* over-weights short batches). Back-propagate each
micro-batch's **summed** loss, pass its item count to ``accumulate_from(..., num_items=n)`` and call
``apply_to(..., normalize="items")``: the result is the gradient of the mean loss over all items at once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from hf_optim._utils import non_negative_int, parameters_of

__all__ = ["GradientAccumulator"]

Normalize = Literal["steps", "items"] | None


class GradientAccumulator:
    """Accumulates gradients over micro-steps, on the current process only.

    transformers 4.x's TF ``GradientAccumulator`` for PyTorch: ``acc(gradients)``, ``acc.step``, ``acc.gradients``,
    ``acc.reset()``; plus :meth:`accumulate_from` / :meth:`apply_to`, which read and write the parameters'
    ``.grad`` and can normalise by the number of items (tokens) instead of micro-steps, which keeps accumulation
    exact when micro-batches have unequal token counts. Its state saves with :func:`hf_optim.save_state`.

    Args:
        dtype: dtype of the accumulation buffers (e.g. ``torch.float32`` for bf16 gradients); by default each
            buffer has its gradient's dtype, as in the TF original.

    Raises:
        ValueError: If ``dtype`` is not a floating-point ``torch.dtype`` or ``None``.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Linear(2, 1, bias=False)
        accumulator = hf_optim.GradientAccumulator()
        for x in (torch.ones(1, 2), 3 * torch.ones(1, 2)):
            model(x).sum().backward()
            accumulator.accumulate_from(model)  # adds .grad and clears it
        accumulator.apply_to(model)  # the mean over the 2 micro-steps
        assert torch.equal(model.weight.grad, torch.full((1, 2), 2.0))
        ```
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self._gradients: list[torch.Tensor | None] = []
        self._initialized = False
        self._step = 0
        self._num_items = 0
        self._counts_items: bool | None = None  # whether micro-steps passed num_items (all or none must)

    # --- the TF API ----------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Number of accumulated calls (micro-steps) since the last reset."""
        return self._step

    @property
    def num_items(self) -> int:
        """Number of items (e.g. tokens) passed as ``num_items`` since the last reset."""
        return self._num_items

    @property
    def gradients(self) -> list[torch.Tensor | None]:
        """The accumulated gradients (the live buffers; ``None`` where no gradient was ever given)."""
        if not self._initialized:
            raise ValueError("The accumulator should be called first to initialize the gradients")
        return list(self._gradients)

    def __call__(self, gradients: Sequence[torch.Tensor | None], num_items: Any = None) -> None:
        """Add ``gradients`` (tensors or ``None``); the first call fixes their number.

        ``num_items`` (int or scalar tensor) counts the items of this micro-batch, for ``normalize="items"``.
        Unlike the TF original, a slot that was ``None`` so far starts accumulating when a gradient arrives.
        """
        self._accumulate(list(gradients), num_items, take=False)

    def reset(self) -> None:
        """Zero the accumulated gradients, the step and the item count (buffers are kept)."""
        with torch.no_grad():
            for buffer in self._gradients:
                if buffer is not None:
                    buffer.zero_()
        self._step = 0
        self._num_items = 0
        self._counts_items = None

    # --- PyTorch conveniences -------------------------------------------------------------------------------------

    def accumulate_from(
        self, params_or_model: nn.Module | Iterable[Any], num_items: Any = None, *, zero_grad: bool = True
    ) -> None:
        """Accumulate the ``.grad`` of ``params_or_model``'s parameters (``None`` for those without one).

        With ``zero_grad`` (default) the parameters' ``.grad`` is then set to ``None`` for the next micro-batch; a
        gradient that is not a view is then taken over without a copy.
        """
        params = parameters_of(params_or_model)
        self._accumulate([p.grad for p in params], num_items, take=zero_grad)
        if zero_grad:
            for p in params:
                p.grad = None

    def apply_to(
        self,
        params_or_model: nn.Module | Iterable[Any],
        normalize: Normalize = "steps",
        *,
        num_items: Any = None,
        reset: bool = True,
    ) -> None:
        """Write the accumulated gradients to the parameters' ``.grad`` (replacing it), ready for ``step()``.

        ``normalize``: ``"steps"`` divides by :attr:`step`, ``"items"`` by :attr:`num_items` (or by ``num_items``
        if given, e.g. the item count over all processes), ``None`` writes the sum. With ``reset`` (default) the
        buffers are handed to the parameters and the accumulator starts over; otherwise copies are written.
        """
        if not self._initialized or self._step == 0:
            raise ValueError("nothing to apply: no gradients were accumulated since the last reset")
        params = parameters_of(params_or_model)
        if len(params) != len(self._gradients):
            raise ValueError(f"Expected {len(self._gradients)} parameters, but got {len(params)}")
        if normalize == "steps":
            divisor: float | None = float(self._step)
        elif normalize == "items":
            if num_items is not None:
                if isinstance(num_items, torch.Tensor):
                    num_items = num_items.item()
                if (
                    isinstance(num_items, bool)
                    or not isinstance(num_items, numbers.Real)
                    or not float(num_items) > 0
                ):
                    raise ValueError(f"num_items must be a positive number, got {num_items!r}")
                divisor = float(num_items)
            else:
                if not self._counts_items:
                    raise ValueError(
                        'normalize="items" needs num_items passed with every accumulated micro-step'
                    )
                if self._num_items == 0:
                    raise ValueError('normalize="items": the accumulated micro-steps counted 0 items')
                divisor = float(self._num_items)
        elif normalize is None:
            divisor = None
        else:
            raise ValueError(f'normalize must be "steps", "items" or None, got {normalize!r}')
        for param, buffer in zip(params, self._gradients, strict=True):
            if buffer is not None and buffer.shape != param.shape:
                raise ValueError(
                    f"accumulated gradient of shape {tuple(buffer.shape)} does not match parameter of shape "
                    f"{tuple(param.shape)}"
                )
        with torch.no_grad():
            for param, buffer in zip(params, self._gradients, strict=True):
                if buffer is None:
                    param.grad = None
                    continue
                if reset and buffer.dtype == param.dtype and buffer.device == param.device:
                    grad = buffer
                    if divisor is not None:
                        grad.div_(divisor)
                else:
                    grad = buffer / divisor if divisor is not None else buffer.clone()
                    grad = grad.to(dtype=param.dtype, device=param.device)
                param.grad = grad
        if reset:
            self._gradients = [None] * len(self._gradients)
            self._step = 0
            self._num_items = 0
            self._counts_items = None

    # --- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"gradients": list[Tensor | None], "step": int, "num_items": int}`` (tensors are the live buffers)."""
        return {"gradients": list(self._gradients), "step": self._step, "num_items": self._num_items}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (mid-accumulation checkpoints resume exactly); nothing changes on error.

        Loaded tensors are copied into existing buffers of the same shape (keeping their device and dtype),
        otherwise cloned (cast to ``dtype`` if set).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = sorted({"gradients", "step", "num_items"} - set(state))
        if missing:
            raise ValueError(f"accumulator state is missing {', '.join(missing)}")
        gradients = state["gradients"]
        if isinstance(gradients, (str, bytes, torch.Tensor)) or not isinstance(gradients, Sequence):
            raise TypeError(
                f"state['gradients'] must be a list of tensors or None, got {type(gradients).__name__}"
            )
        for i, g in enumerate(gradients):
            if g is not None and not isinstance(g, torch.Tensor):
                raise TypeError(f"state['gradients'][{i}] must be a tensor or None, got {type(g).__name__}")
        step = non_negative_int(state["step"], "state['step']")
        num_items = non_negative_int(state["num_items"], "state['num_items']")
        if step > 0 and not gradients:
            raise ValueError("state['step'] > 0 but state['gradients'] is empty")
        if self._initialized and len(gradients) != len(self._gradients):
            raise ValueError(f"Expected {len(self._gradients)} gradients, but got {len(gradients)}")

        new: list[torch.Tensor | None] = []
        with torch.no_grad():
            for i, g in enumerate(gradients):
                old = self._gradients[i] if i < len(self._gradients) else None
                if g is None:
                    new.append(None)
                elif old is not None and old.shape == g.shape:
                    new.append(old.copy_(g))
                else:
                    new.append(g.detach().to(dtype=self.dtype or g.dtype, copy=True))
        self._gradients = new
        self._initialized = bool(gradients) or self._initialized
        self._step = step
        self._num_items = num_items
        self._counts_items = True if num_items > 0 else None

    # --- internals ------------------------------------------------------------------------------------------------

    def _accumulate(self, gradients: list[torch.Tensor | None], num_items: Any, *, take: bool) -> None:
        if self._initialized and len(gradients) != len(self._gradients):
            raise ValueError(f"Expected {len(self._gradients)} gradients, but got {len(gradients)}")
        for i, g in enumerate(gradients):
            if g is not None and not isinstance(g, torch.Tensor):
                raise TypeError(f"gradients[{i}] must be a tensor or None, got {type(g).__name__}")
            buffer = self._gradients[i] if self._initialized else None
            if g is not None and buffer is not None and buffer.shape != g.shape:
                raise ValueError(
                    f"gradients[{i}] has shape {tuple(g.shape)}, but the accumulated one has {tuple(buffer.shape)}"
                )
        counts = num_items is not None
        items = non_negative_int(num_items, "num_items") if counts else 0
        if self._step > 0 and self._counts_items is not None and self._counts_items != counts:
            raise ValueError(
                "num_items must be given for all accumulated micro-steps or for none "
                f"({'given' if self._counts_items else 'not given'} before, {'given' if counts else 'not'} now)"
            )

        if not self._initialized:
            self._gradients = [None] * len(gradients)
            self._initialized = True
        with torch.no_grad():
            for i, g in enumerate(gradients):
                if g is None:
                    continue
                is_view = g._is_view()
                g = g.detach()
                buffer = self._gradients[i]
                if buffer is not None:
                    if buffer.device != g.device:  # e.g. resumed from a CPU checkpoint
                        buffer = self._gradients[i] = buffer.to(g.device)
                    buffer.add_(g)
                elif take and not is_view and (self.dtype is None or g.dtype == self.dtype):
                    self._gradients[i] = g
                else:
                    self._gradients[i] = g.to(dtype=self.dtype or g.dtype, copy=True)
        self._step += 1
        self._num_items += items
        self._counts_items = counts
