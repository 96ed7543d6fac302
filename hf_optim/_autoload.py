"""Interpreter-start hook: teach transformers hf_optim's optimizer and schedule names when it loads them.

transformers has no plugin API for ``TrainingArguments(optim=...)``: the names are an enum and a private
handler table, filled when ``transformers.training_args`` / ``trainer_optimizer`` / ``optimization`` are
imported. So that an unmodified script (``HfArgumentParser(TrainingArguments)`` run with ``--optim adamw_hf``)
works once hf_optim is installed, the wheel ships ``hf_optim_autoload.pth``, which runs
``import _hf_optim_autoload`` (a copy of this file, installed at the top level of site-packages so that
start-up does not import the ``hf_optim`` package and torch).

At start-up this only puts a small finder at the front of ``sys.meta_path``: it imports nothing beyond
``os`` and ``sys`` and costs well under a millisecond. The finder ignores every module except the watched
transformers ones; after one of those has executed it imports ``hf_optim.integrations.transformers`` and
calls ``sync``, which registers the names (idempotently). It never raises: failures are logged at debug level
(the integration itself logs a warning naming the transformers version if transformers' internals changed).

Set ``HF_OPTIM_DISABLE_AUTOLOAD=1`` to switch the start-up hook off. ``import hf_optim`` installs the same
finder regardless (an explicit import is an explicit request), so either import order works.

Names that transformers removed (``from transformers import AdamW``, ``from transformers.optimization import
AdamW``, ``AdamWeightDecay``, ``GradientAccumulator``): the finder also watches the ``transformers`` package and
gives it (and ``transformers.optimization``) a module-level ``__getattr__`` (PEP 562) for exactly those names;
every other name falls through to transformers' own lookup, unchanged. Opt-in, with ``HF_OPTIM_LEGACY_IMPORTS=1``,
they resolve to hf_optim's classes (imported only when asked for); otherwise importing one raises an
``ImportError`` saying where it went, instead of transformers' bare "cannot import name".
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at start-up; type checkers take the name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

ENV_DISABLE = "HF_OPTIM_DISABLE_AUTOLOAD"
ENV_LEGACY_IMPORTS = "HF_OPTIM_LEGACY_IMPORTS"

# transformers modules after whose execution hf_optim registers its names:
# training_args defines OptimizerNames (and imports SchedulerType), trainer_optimizer holds the handler
# table, optimization holds TYPE_TO_SCHEDULER_FUNCTION; trainer's Trainer learns to resume from hf_optim's state.
WATCHED = frozenset(
    {
        "transformers.training_args",
        "transformers.trainer_optimizer",
        "transformers.optimization",
        "transformers.trainer",
    }
)

_MARKER = "_hf_optim_autoload_finder"

# With HF_OPTIM_LEGACY_IMPORTS: transformers module -> {removed name: (hf_optim module, attribute)}
LEGACY_NAMES = {
    "transformers": {
        "AdamW": ("hf_optim.optimizers", "AdamW"),
        "AdamWeightDecay": ("hf_optim.optimizers", "AdamWeightDecay"),
        "GradientAccumulator": ("hf_optim.accumulation", "GradientAccumulator"),
    },
    "transformers.optimization": {"AdamW": ("hf_optim.optimizers", "AdamW")},
}
_LEGACY_MARKER = "_hf_optim_legacy_getattr"


def _debug(message: str, *args: object) -> None:
    # `logging` is imported lazily: it is not loaded at interpreter start and this path is rare.
    import logging

    logging.getLogger("hf_optim.autoload").debug(message, *args)


def autoload_disabled() -> bool:
    """Whether ``HF_OPTIM_DISABLE_AUTOLOAD`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(ENV_DISABLE, "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def legacy_imports_enabled() -> bool:
    """Whether ``HF_OPTIM_LEGACY_IMPORTS`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(ENV_LEGACY_IMPORTS, "").strip().upper() in {"1", "TRUE", "YES", "ON"}


class _LegacyGetattr:
    """A module's ``__getattr__`` serving the names transformers removed from hf_optim, imported on first use.

    Any other name goes to the module's previous ``__getattr__`` if it had one, else raises ``AttributeError``
    (then a ``_LazyModule`` still runs its own lookup: the class's ``__getattr__`` comes after this one).
    """

    _hf_optim_legacy_getattr = True

    def __init__(self, module_name: str, names: dict, previous: Callable[[str], object] | None) -> None:
        self._module_name = module_name
        self._names = names
        self._previous = previous

    def __call__(self, name: str) -> object:
        target = self._names.get(name)
        if target is None:
            if self._previous is not None:
                return self._previous(name)
            raise AttributeError(f"module {self._module_name!r} has no attribute {name!r}")
        if not legacy_imports_enabled():
            # An ImportError (not an AttributeError, which `from ... import` would replace with its own bare
            # message) that says where the name went.
            raise ImportError(
                f"{name} was removed from transformers; hf_optim has it with the same math: "
                f"`from {target[0].split('.')[0]} import {name}`, or set {ENV_LEGACY_IMPORTS}=1 to make "
                f"`from {self._module_name} import {name}` work again",
                name=self._module_name,
            )
        import importlib

        value = getattr(importlib.import_module(target[0]), target[1])
        _debug("hf_optim legacy imports: %s.%s is %s.%s", self._module_name, name, target[0], target[1])
        return value


def install_legacy_names(fullname: str) -> None:
    """Give ``sys.modules[fullname]`` the ``__getattr__`` for its removed names (idempotent; never raises)."""
    try:
        module = sys.modules.get(fullname)
        names = LEGACY_NAMES.get(fullname)
        if module is None or names is None:
            return
        previous = module.__dict__.get("__getattr__")
        if getattr(previous, _LEGACY_MARKER, False):
            return
        module.__dict__["__getattr__"] = _LegacyGetattr(fullname, names, previous)
    except Exception as err:
        _debug("hf_optim legacy imports: could not hook %s: %r", fullname, err)


def _on_loaded(fullname: str) -> None:
    """Called right after a watched module executed: register hf_optim's names (never raises)."""
    if fullname in LEGACY_NAMES:
        install_legacy_names(fullname)
    if fullname not in WATCHED:
        return
    try:
        from hf_optim.integrations.transformers import sync

        sync(just_loaded=fullname)
    except Exception as err:  # the hook must never break the user's import
        _debug("hf_optim autoload: registering with transformers after %s failed: %r", fullname, err)


class _HookedLoader:
    """Delegating loader that runs ``_on_loaded`` after the real loader executed the module."""

    def __init__(self, loader: Loader, spec: ModuleSpec) -> None:
        self._loader = loader
        self._spec = spec

    def create_module(self, spec: ModuleSpec) -> object:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # Hand the real loader back before executing, so nothing of this wrapper stays visible.
        try:
            self._spec.loader = self._loader
            module.__loader__ = self._loader
        except Exception:
            pass
        self._loader.exec_module(module)
        _on_loaded(module.__name__)

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class _TransformersFinder:
    """``sys.meta_path`` finder that only wraps the loaders of the ``WATCHED`` and ``LEGACY_NAMES`` modules
    (returns None otherwise)."""

    _hf_optim_autoload_finder = True

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in WATCHED and fullname not in LEGACY_NAMES:
            return None
        try:
            for finder in list(sys.meta_path):
                if getattr(finder, _MARKER, False):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is None:
                    continue
                loader = getattr(spec, "loader", None)
                if loader is not None and hasattr(loader, "exec_module"):
                    spec.loader = _HookedLoader(loader, spec)
                return spec
        except Exception as err:
            _debug("hf_optim autoload: could not hook %s: %r", fullname, err)
        return None


def install() -> bool:
    """Put the finder at the front of ``sys.meta_path`` unless one is there already; return True if added.

    Idempotent across the two copies of this file (``hf_optim._autoload`` and ``_hf_optim_autoload``).
    """
    if any(getattr(finder, _MARKER, False) for finder in sys.meta_path):
        return False
    sys.meta_path.insert(0, _TransformersFinder())
    return True


def sync_if_loaded() -> None:
    """If transformers already imported a watched module, register now (``import hf_optim`` after
    transformers). Imports nothing from transformers; never raises."""
    for name in LEGACY_NAMES:
        install_legacy_names(name)
    if not any(name in sys.modules for name in WATCHED):
        return
    try:
        from hf_optim.integrations.transformers import sync

        sync()
    except Exception as err:
        _debug("hf_optim autoload: registering with transformers failed: %r", err)


def _startup() -> None:
    try:
        if not autoload_disabled():
            install()
    except Exception as err:  # never break interpreter start
        _debug("hf_optim autoload: install failed: %r", err)


if __name__ == "_hf_optim_autoload":  # imported by hf_optim_autoload.pth at interpreter start
    _startup()
