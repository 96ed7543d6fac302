"""The private attributes of ``accelerate.Accelerator`` that hf_optim relies on, in one place.

Accelerate has no public API listing what ``prepare`` and ``register_for_checkpointing`` collected, nor a switch
to leave objects out of ``save_state`` / ``load_state``. hf_optim reads (and, for the length of one call, empties)
the lists ``Accelerator._models``, ``_optimizers``, ``_schedulers``, ``_dataloaders`` and ``_custom_objects``.
Every access goes through this module, which checks them first: if a release of Accelerate changed them, the
call raises :class:`~hf_optim.errors.AccelerateIntegrationError` naming the Accelerate version, instead of
failing somewhere inside a save or load.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from hf_optim.errors import AccelerateIntegrationError

__all__ = [
    "MINIMUM_VERSION",
    "check_accelerator",
    "dataloaders",
    "hidden_from_accelerate",
    "models",
    "optimizers",
    "registered_objects",
    "schedulers",
]

#: the oldest Accelerate whose internals are known to be these (pyproject's ``accelerate`` extra)
MINIMUM_VERSION = (1, 15)

_LISTS = ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects")


def _version() -> str:
    import accelerate

    return str(getattr(accelerate, "__version__", "unknown"))


def _integration_error(what: str) -> AccelerateIntegrationError:
    from hf_optim import __version__

    return AccelerateIntegrationError(
        f"hf_optim {__version__} cannot work with Accelerate {_version()}: {what}. Accelerate's internals changed "
        "in this release; please report it to hf_optim (meanwhile save with hf_optim.save_state and load with "
        "hf_optim.load_state directly)."
    )


def check_accelerator(accelerator: Any) -> None:
    """Raise :class:`~hf_optim.errors.AccelerateIntegrationError` unless ``accelerator`` comes from a supported
    Accelerate and has the lists hf_optim reads."""
    match = re.match(r"(\d+)\.(\d+)", _version())
    if match is None or (int(match[1]), int(match[2])) < MINIMUM_VERSION:
        minimum = ".".join(map(str, MINIMUM_VERSION))
        raise _integration_error(f"Accelerate >= {minimum} is needed")
    for name in _LISTS:
        if not isinstance(getattr(accelerator, name, None), list):
            raise _integration_error(f"Accelerator.{name} is not a list")


def _copy_of(accelerator: Any, name: str) -> list[Any]:
    check_accelerator(accelerator)
    return list(getattr(accelerator, name))


def models(accelerator: Any) -> list[Any]:
    """The models ``prepare`` registered, in order."""
    return _copy_of(accelerator, "_models")


def optimizers(accelerator: Any) -> list[Any]:
    """The optimizers ``prepare`` registered (Accelerate's wrappers), in order."""
    return _copy_of(accelerator, "_optimizers")


def schedulers(accelerator: Any) -> list[Any]:
    """The schedulers ``prepare`` registered (Accelerate's wrappers, or the objects as given), in order."""
    return _copy_of(accelerator, "_schedulers")


def dataloaders(accelerator: Any) -> list[Any]:
    """The dataloaders ``prepare`` registered, in order."""
    return _copy_of(accelerator, "_dataloaders")


def registered_objects(accelerator: Any) -> list[Any]:
    """The objects given to ``register_for_checkpointing``, in order."""
    return _copy_of(accelerator, "_custom_objects")


@contextlib.contextmanager
def hidden_from_accelerate(
    accelerator: Any,
    *,
    custom_objects: bool = False,
    scaler: bool = False,
    dataloaders: bool = False,
    models: bool = False,
) -> Iterator[None]:
    """Hide the prepared optimizers and schedulers (and, if asked, the registered objects, the gradient scaler,
    the dataloaders and the models) from Accelerate's own ``save_state`` / ``load_state`` for the block.

    Emptying its lists keeps everything else Accelerate does (automatic naming and rotation, hooks, RNG,
    samplers, its step counter) unchanged; they are put back even if the block raises.
    """
    check_accelerator(accelerator)
    saved = accelerator._optimizers, accelerator._schedulers, accelerator._custom_objects
    saved_scaler, saved_loaders, saved_models = (
        accelerator.scaler,
        accelerator._dataloaders,
        accelerator._models,
    )
    accelerator._optimizers, accelerator._schedulers = [], []
    if models:
        accelerator._models = []
    if custom_objects:
        accelerator._custom_objects = []
    if scaler:
        accelerator.scaler = None
    if dataloaders:
        accelerator._dataloaders = []
    try:
        yield
    finally:
        accelerator._optimizers, accelerator._schedulers, accelerator._custom_objects = saved
        accelerator.scaler, accelerator._dataloaders = saved_scaler, saved_loaders
        accelerator._models = saved_models
