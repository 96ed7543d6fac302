"""transformers' own optimizer names (``adamw_torch``, ``adamw_torch_fused``, ``sgd``, ``adafactor``, ...) for
hf_optim's registry: ``hf_optim.create_optimizer("adamw_torch", model, lr=...)`` builds what ``Trainer`` builds
for ``TrainingArguments(optim="adamw_torch", learning_rate=...)``.

The optimizer class and its arguments come from transformers itself (``Trainer.get_optimizer_cls_and_kwargs``
with a ``TrainingArguments``), so they follow the installed release. The bridge adds :class:`TransformersOptimizers`
to the registry when transformers is imported. Optimizers whose handler needs the model (GaLore, APOLLO, LOMO,
factory-built optimizers) are listed but can only be built by ``Trainer``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from hf_optim.registry import OptimizerInfo

__all__ = ["TransformersOptimizers", "transformers_optimizer_factory"]

SOURCE = "transformers"
TRAINING_ARGS = "transformers.training_args"
TRAINER_OPTIMIZER = "transformers.trainer_optimizer"


def _optim_args_text(optim_args: str | Mapping[str, Any] | None) -> str | None:
    if optim_args is None or isinstance(optim_args, str):
        return optim_args
    if not isinstance(optim_args, Mapping):
        raise ValueError(f"optim_args must be a 'key=value,...' string or a mapping, got {optim_args!r}")
    return ",".join(f"{key}={value}" for key, value in optim_args.items())


def _grouped(params: Any, weight_decay: float) -> Any:
    """``params`` as Trainer passes them: group dicts as given, a flat list as one group with ``weight_decay``."""
    params = list(params)
    if params and all(isinstance(item, Mapping) for item in params):
        return params
    return [{"params": params, "weight_decay": weight_decay}]


def transformers_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """``factory(params, lr=..., weight_decay=..., betas=..., eps=..., optim_args=..., **optimizer_kwargs)``
    building transformers' optimizer ``name``.

    ``lr``, ``betas``, ``eps`` and ``optim_args`` (a string as in ``TrainingArguments`` or a mapping) go to a
    ``TrainingArguments(optim=name, ...)`` (``None``: its default); transformers' handler picks the class and its
    arguments; ``optimizer_kwargs`` are added on top. ``weight_decay`` goes to parameters not already in group
    dicts (Trainer puts it in its decay group).
    """

    def factory(
        params: Any,
        lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        optim_args: str | Mapping[str, Any] | None = None,
        **optimizer_kwargs: Any,
    ) -> torch.optim.Optimizer:
        from transformers import Trainer, TrainingArguments
        from transformers.trainer_optimizer import is_optimizer_factory

        training: dict[str, Any] = {"optim": name, "weight_decay": weight_decay}
        if lr is not None:
            training["learning_rate"] = lr
        if betas is not None:
            if isinstance(betas, str) or len(betas) != 2:
                raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
            training["adam_beta1"], training["adam_beta2"] = betas
        if eps is not None:
            training["adam_epsilon"] = eps
        text = _optim_args_text(optim_args)
        if text:
            training["optim_args"] = text
        args = TrainingArguments(**training)
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
        if is_optimizer_factory(optimizer_cls) or "params" in kwargs or "model" in kwargs:
            raise ValueError(
                f"transformers' optimizer {name!r} is built from the model by Trainer; use Trainer with "
                f"TrainingArguments(optim={name!r}) instead of hf_optim.create_optimizer"
            )
        kwargs = {**kwargs, **optimizer_kwargs}
        return optimizer_cls(_grouped(params, weight_decay), **kwargs)

    factory.__name__ = f"transformers_optimizer_{name}"
    factory.__qualname__ = factory.__name__
    return factory


class TransformersOptimizers:
    """Registry provider: the names in transformers' optimizer handler table, except those hf_optim added."""

    source = SOURCE

    def __init__(self, added_by_hf_optim: Collection[str]) -> None:
        self._added = added_by_hf_optim  # live set kept by the bridge

    def names(self) -> list[str]:
        """transformers' optimizer names (empty until ``transformers.trainer_optimizer`` is imported)."""
        module = sys.modules.get(TRAINER_OPTIMIZER)
        handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
        if not isinstance(handlers, Mapping):
            return []
        values = (str(getattr(key, "value", key)) for key in handlers)
        return sorted(value for value in values if value not in self._added)

    def info(self, name: str) -> OptimizerInfo | None:
        """The registry record of transformers' optimizer ``name`` (``None`` if transformers has no such name)."""
        if name not in self.names():
            return None
        return OptimizerInfo(
            name=name,
            factory=transformers_optimizer_factory(name),
            description=f"built as transformers' Trainer builds optim={name!r}",
            source=SOURCE,
        )
