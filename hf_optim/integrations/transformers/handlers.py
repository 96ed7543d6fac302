"""What transformers calls for an hf_optim name: optimizer handlers and schedule functions.

``optimizer_handler(name)`` is an entry for ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (``handler(ctx)
-> (optimizer class or factory, kwargs)``, as Trainer's own handlers); ``schedule_function(name)`` is an entry for
``transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION``. Both look the name up in hf_optim's registry when
called, so ``register_optimizer(..., overwrite=True)`` takes effect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_optim.integrations.transformers.optim_args import parse_optim_args
from hf_optim.registry import OptimizerInfo, create_optimizer, create_scheduler, get_optimizer_info

__all__ = ["map_training_arguments", "optimizer_handler", "schedule_function", "trainer_groups"]

_KERAS_PATTERNS = ("include_in_weight_decay", "exclude_from_weight_decay")
# TrainingArguments values transformers gives every optimizer; betas / eps (adam_*) only go to Adam-like ones.
_UNIVERSAL_ARGS = ("lr", "weight_decay")


def map_training_arguments(args: Any, info: OptimizerInfo, lr: float | None = None) -> dict[str, Any]:
    """TrainingArguments' ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` under the
    registry entry's own argument names (``lr``/``learning_rate``, ``betas``/``beta_1``+``beta_2``,
    ``eps``/``epsilon``, ``weight_decay``/``weight_decay_rate``).

    ``lr`` and ``weight_decay`` go to every factory that accepts them, ``**kwargs`` and factories without a
    signature included; ``betas`` and ``eps`` only to factories that declare them (or map them in ``arg_names``),
    as transformers passes ``adam_*`` only to Adam-like optimizers.
    """
    signature = info.signature()

    def takes(key: str) -> bool:
        if key in info.arg_names:
            return True
        if key in _UNIVERSAL_ARGS:
            return info.accepts(key)
        return signature is not None and key in signature.parameters and info.accepts(key)

    common = {
        "lr": args.learning_rate if lr is None else lr,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }
    return info.map_common({k: v for k, v in common.items() if takes(k)}, "TrainingArguments")


def _named_trainable(model: Any) -> list[tuple[str, Any]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainer_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainer's decay / no-decay groups (its default ``get_decay_parameter_names``) with ``weight_decay``."""
    import transformers.trainer  # imported already when a Trainer calls this

    decay = set(transformers.trainer.Trainer.get_decay_parameter_names(None, model))
    named = _named_trainable(model)
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def optimizer_handler(name: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    """A handler for ``_OPTIMIZER_HANDLERS``: ``handler(ctx) -> (optimizer class, kwargs)`` for the hf_optim
    optimizer registered as ``name`` (looked up at call time, so ``register_optimizer(..., overwrite=True)``
    takes effect).

    Argument precedence: ``optim_args`` > TrainingArguments > the registry entry's ``defaults``. Trainer keeps
    building its decay / no-decay groups (biases and norms without decay) and passes them to the class, except
    when ``optim_args`` sets ``include_in_weight_decay`` / ``exclude_from_weight_decay``: then one group of
    named parameters goes to the optimizer and its Keras name rule decides. A weight decay in ``optim_args``
    (``weight_decay`` or the optimizer's own name) replaces ``TrainingArguments.weight_decay`` in the decay group:
    the groups are then built here, by Trainer's default ``get_decay_parameter_names``.
    """

    def handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
        info = get_optimizer_info(name)
        factory = info.factory
        args = ctx.args
        lr = getattr(ctx, "optimizer_kwargs", {}).get("lr")
        kwargs = info.map_common(info.defaults, "defaults")
        kwargs.update(map_training_arguments(args, info, lr))
        from_optim_args = parse_optim_args(getattr(ctx, "optim_args", None) or {}, info)
        kwargs.update(from_optim_args)
        own_weight_decay = info.own_name("weight_decay")  # a tuple (split name) is never a key of optim_args
        weight_decay: float = args.weight_decay
        if isinstance(own_weight_decay, str) and own_weight_decay in from_optim_args:
            weight_decay = from_optim_args[own_weight_decay]
        model = getattr(ctx, "model", None)

        keras_rule = any(kwargs.get(key) for key in _KERAS_PATTERNS)
        if keras_rule or own_weight_decay in from_optim_args:
            if model is None:
                what = "/".join(_KERAS_PATTERNS) if keras_rule else own_weight_decay
                raise ValueError(f"{name}: {what} in optim_args needs Trainer's model (to build the groups)")
            if keras_rule:
                kwargs["params"] = [{"params": _named_trainable(model), "weight_decay": weight_decay}]
            else:
                kwargs["params"] = trainer_groups(model, weight_decay)

        if isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer):
            return factory, kwargs

        # A plain factory function: transformers' factory protocol calls `cls()(model, **kwargs)`.
        def make_factory() -> Callable[..., Any]:
            def build(opt_model: Any, **factory_kwargs: Any) -> Any:
                params = factory_kwargs.pop("params", None)
                if params is None:
                    params = trainer_groups(opt_model, weight_decay)
                return create_optimizer(name, params, **factory_kwargs)

            return build

        return make_factory, kwargs

    handler.__name__ = f"hf_optim_handler_{name}"
    handler.__qualname__ = handler.__name__
    return handler


def schedule_function(name: str) -> Callable[..., Any]:
    """An entry for ``TYPE_TO_SCHEDULER_FUNCTION``: builds the hf_optim schedule ``name`` (a ``LambdaLR``
    carrying ``hf_optim_config``) from transformers' ``get_scheduler`` arguments."""

    def build(
        optimizer: Any,
        num_warmup_steps: int | None = None,
        num_training_steps: int | None = None,
        **kwargs: Any,
    ) -> Any:
        return create_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            **kwargs,
        )

    build.__name__ = f"hf_optim_schedule_{name}"
    build.__qualname__ = build.__name__
    return build
