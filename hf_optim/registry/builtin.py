"""hf_optim's built-in registry entries, one ``register_*`` function per group (timm's ``_register_*`` style)."""

from __future__ import annotations

from hf_optim import schedules
from hf_optim.optimizers import AdamW, AdamWeightDecay, BertAdam, OpenAIAdam
from hf_optim.registry.core import Registry

__all__ = ["register_builtin", "register_legacy", "register_optimizers", "register_schedulers"]


def register_optimizers(registry: Registry) -> None:
    registry.register_optimizer(
        "adamw_hf",
        AdamW,
        description="AdamW of transformers 4.x (legacy-exact, with correct_bias; decoupled decay after the update)",
    )
    registry.register_optimizer(
        "adam_weight_decay",
        AdamWeightDecay,
        description="AdamWeightDecay of transformers 4.x TF (Keras Adam math, decay by parameter-name patterns)",
        arg_names={
            "lr": "learning_rate",
            "weight_decay": "weight_decay_rate",
            "betas": ("beta_1", "beta_2"),
            "eps": "epsilon",
        },
    )


def register_schedulers(registry: Registry) -> None:
    for name, factory, description in (
        ("linear", schedules.get_linear_schedule_with_warmup, "linear warmup, then linear decay to 0"),
        ("cosine", schedules.get_cosine_schedule_with_warmup, "linear warmup, then cosine decay to 0"),
        (
            "cosine_with_restarts",
            schedules.get_cosine_with_hard_restarts_schedule_with_warmup,
            "linear warmup, then num_cycles cosine decays with hard restarts",
        ),
        (
            "polynomial",
            schedules.get_polynomial_decay_schedule_with_warmup,
            "linear warmup, then polynomial decay (power) to lr_end",
        ),
        ("constant", schedules.get_constant_schedule, "constant learning rate"),
        ("constant_with_warmup", schedules.get_constant_schedule_with_warmup, "linear warmup, then constant"),
        ("inverse_sqrt", schedules.get_inverse_sqrt_schedule, "linear warmup, then 1/sqrt decay (timescale)"),
        (
            "cosine_with_min_lr",
            schedules.get_cosine_with_min_lr_schedule_with_warmup,
            "linear warmup, then cosine decay to min_lr or min_lr_rate",
        ),
        (
            "cosine_warmup_with_min_lr",
            schedules.get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
            "warmup from warmup_lr_rate, then cosine decay to min_lr or min_lr_rate",
        ),
        (
            "warmup_stable_decay",
            schedules.get_wsd_schedule,
            "warmup, constant phase, then decay (linear/cosine/1-sqrt) over num_decay_steps",
        ),
    ):
        registry.register_scheduler(name, factory, description=description)


def register_legacy(registry: Registry) -> None:
    # pytorch-pretrained-bert's optimizers, whose lr schedule is built in (Adam's betas / eps are b1, b2, e)
    legacy_names = {"betas": ("b1", "b2"), "eps": "e"}
    registry.register_optimizer(
        "bert_adam",
        BertAdam,
        description="BertAdam of pytorch-pretrained-bert (built-in schedule, per-tensor clipping, no bias correction)",
        arg_names=legacy_names,
    )
    registry.register_optimizer(
        "openai_adam",
        OpenAIAdam,
        description="OpenAIAdam of pytorch-pretrained-bert (built-in schedule, decay of matrices after the update)",
        arg_names=legacy_names,
    )


def register_builtin(registry: Registry) -> None:
    """Every built-in entry: hf_optim's optimizers, pytorch-pretrained-bert's, and transformers' schedules."""
    register_optimizers(registry)
    register_legacy(registry)
    register_schedulers(registry)
