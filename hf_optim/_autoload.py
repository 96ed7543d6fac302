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
"""

import os
import sys

ENV_DISABLE = "HF_OPTIM_DISABLE_AUTOLOAD"

# transformers modules after whose execution hf_optim registers its names:
# training_args defines OptimizerNames (and imports SchedulerType), trainer_optimizer holds the handler
# table, optimization holds TYPE_TO_SCHEDULER_FUNCTION.
WATCHED = frozenset(
    {"transformers.training_args", "transformers.trainer_optimizer", "transformers.optimization"}
)

_MARKER = "_hf_optim_autoload_finder"


def _debug(message: str, *args: object) -> None:
    # `logging` is imported lazily: it is not loaded at interpreter start and this path is rare.
    import logging

    logging.getLogger("hf_optim.autoload").debug(message, *args)


def autoload_disabled() -> bool:
    """Whether ``HF_OPTIM_DISABLE_AUTOLOAD`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(ENV_DISABLE, "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def _on_loaded(fullname: str) -> None:
    """Called right after a watched module executed: register hf_optim's names (never raises)."""
    try:
        from hf_optim.integrations.transformers import sync

        sync(just_loaded=fullname)
    except Exception as err:  # the hook must never break the user's import
        _debug("hf_optim autoload: registering with transformers after %s failed: %r", fullname, err)


class _HookedLoader:
    """Delegating loader that runs ``_on_loaded`` after the real loader executed the module."""

    def __init__(self, loader: object, spec: object) -> None:
        self._loader = loader
        self._spec = spec

    def create_module(self, spec: object) -> object:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        # Hand the real loader back before executing, so nothing of this wrapper stays visible.
        try:
            self._spec.loader = self._loader  # type: ignore[attr-defined]
            module.__loader__ = self._loader  # type: ignore[attr-defined]
        except Exception:
            pass
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        _on_loaded(module.__name__)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


class _TransformersFinder:
    """``sys.meta_path`` finder that only wraps the loaders of ``WATCHED`` modules (returns None otherwise)."""

    _hf_optim_autoload_finder = True

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in WATCHED:
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
