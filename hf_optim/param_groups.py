"""Which parameters get weight decay: by name (the Keras ``AdamWeightDecay`` rule) and, for a model, by module.

``compile_patterns`` / ``decay_applies`` are the Keras include/exclude rule used by ``AdamWeightDecay``;
``group_parameters`` builds the decay / no-decay parameter groups ``create_optimizer`` gives an optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

__all__ = [
    "compile_patterns",
    "decay_applies",
    "get_decay_parameter_names",
    "get_no_decay_parameter_names",
    "group_parameters",
    "is_norm_module",
]
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


def compile_patterns(patterns: Iterable[str] | None, argument: str) -> list[re.Pattern[str]]:
    """Compile regex patterns; ``TypeError`` / ``ValueError`` name ``argument`` and the bad pattern."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument} must be a list of regex strings, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{argument}: invalid regex {pattern!r}: {err}") from None
    return compiled


def decay_applies(
    name: str,
    *,
    weight_decay: float,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
) -> bool:
    """Whether weight decay applies to the parameter called ``name``.

    No when ``weight_decay == 0``; yes when any ``include`` pattern ``re.search``-matches; else no when any
    ``exclude`` pattern matches; else yes. This is transformers 4.x ``AdamWeightDecay._do_use_weight_decay``.
    """
    if weight_decay == 0:
        return False
    if any(p.search(name) for p in include):
        return True
    return not any(p.search(name) for p in exclude)


# ----------------------------------------------------------------------------------------------------------------
# Grouping a model's parameters into decay / no-decay groups
# ----------------------------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm, _BatchNorm, _InstanceNorm)

#: Lower-cased parameter-name patterns that get no weight decay: those of transformers 5's
#: ``Trainer.get_decay_parameter_names`` (biases and the usual names of normalisation layers).
NO_DECAY_NAME_PATTERNS: tuple[str, ...] = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)
_NO_DECAY_NAME_RES = tuple(re.compile(p) for p in NO_DECAY_NAME_PATTERNS)
_NORM_CLASS_NAME = re.compile(r"Norm(?![a-z])")


def is_norm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: ``nn.LayerNorm``/``nn.RMSNorm``/batch, group and instance
    norms, or any class whose name contains ``Norm`` as a word part (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    if isinstance(module, _NORM_TYPES):
        return True
    return any(_NORM_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__ if cls is not nn.Module)


def get_no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that get no weight decay by default.

    A parameter is excluded when it belongs (at any depth) to a normalisation module (:func:`is_norm_module`) or
    when its lower-cased name matches :data:`NO_DECAY_NAME_PATTERNS`. This is transformers 5's rule (which only
    knows ``nn.LayerNorm`` by type) extended to ``nn.RMSNorm`` and other norm classes. Shared parameters are
    listed under all their names.

    Args:
        model: The model whose parameters are named.

    Returns:
        The names of the biases and normalisation weights (``model.named_parameters()`` names).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        assert hf_optim.get_no_decay_parameter_names(model) == {"0.bias", "1.weight", "1.bias"}
        ```
    """
    excluded: set[str] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if is_norm_module(module):
            excluded.update(n for n, _ in module.named_parameters(prefix=module_name, remove_duplicate=False))
    for name, _ in model.named_parameters(remove_duplicate=False):
        if any(p.search(name.lower()) for p in _NO_DECAY_NAME_RES):
            excluded.add(name)
    return excluded


def get_decay_parameter_names(model: nn.Module) -> list[str]:
    """Names (from ``model.named_parameters()``) of the parameters that get weight decay by default.

    The complement of :func:`get_no_decay_parameter_names`, in ``named_parameters()`` order, like transformers'
    ``Trainer.get_decay_parameter_names``.

    Args:
        model: The model whose parameters are named.

    Returns:
        The names of the parameters to decay (weights of linear, embedding, convolution layers, ...).

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        assert hf_optim.get_decay_parameter_names(model) == ["0.weight"]
        ```
    """
    excluded = get_no_decay_parameter_names(model)
    return [name for name, _ in model.named_parameters() if name not in excluded]


def group_parameters(
    model: nn.Module,
    *,
    weight_decay: float,
    include_in_weight_decay: Iterable[str] | None = None,
    exclude_from_weight_decay: Iterable[str] | None = None,
    weight_decay_key: str = "weight_decay",
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decay group and a no-decay group, by name.

    A parameter is decayed when ``weight_decay != 0`` and either its name matches an
    ``include_in_weight_decay`` regex, or it is neither a default exclusion (:func:`get_no_decay_parameter_names`)
    nor matches an ``exclude_from_weight_decay`` regex: the ``decay_applies`` rule, with the default exclusions
    added to ``exclude``. Groups hold ``(name, parameter)`` pairs (torch keeps them as ``param_names``) and
    ``{weight_decay_key: value}``; empty groups are dropped, the decay group comes first (as in Trainer).

    Args:
        model: The model whose trainable parameters are grouped.
        weight_decay: The decay group's value (the no-decay group gets 0.0).
        include_in_weight_decay: Regexes of names decayed even if excluded otherwise.
        exclude_from_weight_decay: Regexes of names not decayed, besides the default exclusions.
        weight_decay_key: The group key of the value (``"weight_decay_rate"`` for :class:`AdamWeightDecay`).

    Returns:
        Param-group dicts for any ``torch.optim`` optimizer.

    Raises:
        TypeError: If ``model`` is not a ``torch.nn.Module``, or a pattern list is not a list of strings.
        ValueError: If a regex is invalid, or the model has no trainable parameters.

    Example:
        ```python
        import torch
        import hf_optim

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        groups = hf_optim.group_parameters(model, weight_decay=0.01)
        assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.01), (3, 0.0)]
        optimizer = hf_optim.AdamW(groups, lr=1e-3)
        ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = compile_patterns(include_in_weight_decay, "include_in_weight_decay")
    exclude = compile_patterns(exclude_from_weight_decay, "exclude_from_weight_decay")
    defaults = get_no_decay_parameter_names(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if weight_decay != 0 and any(p.search(name) for p in include):
            decay.append((name, param))
        elif name in defaults:
            no_decay.append((name, param))
        elif decay_applies(name, weight_decay=weight_decay, exclude=exclude):
            decay.append((name, param))
        else:
            no_decay.append((name, param))
    if not decay and not no_decay:
        raise ValueError(f"model ({type(model).__name__}) has no trainable parameters")
    groups = []
    if decay:
        groups.append({"params": decay, weight_decay_key: weight_decay})
    if no_decay:
        groups.append({"params": no_decay, weight_decay_key: 0.0})
    return groups
