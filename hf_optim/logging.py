"""hf_optim's logging, in transformers' pattern: one library root logger, ``hf_optim``, with a verbosity.

Every module logs to ``logging.getLogger(__name__)`` (a child of ``hf_optim``); nothing here or anywhere in
hf_optim configures the root logger. The ``hf_optim`` logger gets a level (``HF_OPTIM_VERBOSITY``: ``debug``,
``info``, ``warning`` -- the default --, ``error`` or ``critical``; or :func:`set_verbosity`) and a stderr handler
that prefixes messages with ``hf_optim``. That handler stays silent while the application has configured the
root logger (``logging.basicConfig``, pytest's capture): records still propagate, so they appear once, in the
application's format. :func:`disable_default_handler` removes it; :func:`disable_propagation` stops records
from reaching the root logger.

Example:
    ```python
    import logging
    import hf_optim

    hf_optim.logging.set_verbosity_info()  # or HF_OPTIM_VERBOSITY=info in the environment
    assert hf_optim.logging.get_verbosity() == logging.INFO
    hf_optim.logging.set_verbosity_warning()
    ```
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = [
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "INFO",
    "WARNING",
    "disable_default_handler",
    "disable_propagation",
    "enable_default_handler",
    "enable_propagation",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_error",
    "set_verbosity_info",
    "set_verbosity_warning",
]

CRITICAL = logging.CRITICAL
ERROR = logging.ERROR
WARNING = logging.WARNING
INFO = logging.INFO
DEBUG = logging.DEBUG

LIBRARY_NAME = "hf_optim"
ENV_VERBOSITY = "HF_OPTIM_VERBOSITY"
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
_DEFAULT_LEVEL = WARNING

_lock = threading.Lock()


class _DefaultHandler(logging.StreamHandler):
    """stderr handler with an ``hf_optim`` prefix, silent while the root logger has handlers of its own (the
    record reaches those through propagation, so it is not printed twice)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("[hf_optim] %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        library = logging.getLogger(LIBRARY_NAME)
        if library.propagate and logging.getLogger().handlers:
            return
        # follow sys.stderr when it is replaced (pytest's capsys, contextlib.redirect_stderr)
        self.stream = sys.stderr
        super().emit(record)


_default_handler = _DefaultHandler()


def _env_level() -> int:
    value = os.environ.get(ENV_VERBOSITY, "").strip().lower()
    if not value:
        return _DEFAULT_LEVEL
    if value in _LEVELS:
        return _LEVELS[value]
    logging.getLogger(__name__).warning(
        "unknown %s=%r; expected one of %s", ENV_VERBOSITY, value, ", ".join(_LEVELS)
    )
    return _DEFAULT_LEVEL


def _configure_library_root_logger() -> None:
    with _lock:
        library = logging.getLogger(LIBRARY_NAME)
        if _default_handler not in library.handlers:
            library.addHandler(_default_handler)
        library.setLevel(_env_level())


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (default: ``hf_optim``); only names under ``hf_optim`` are accepted.

    Args:
        name: ``"hf_optim"`` or a name below it (``"hf_optim.state"``); ``None``: ``"hf_optim"``.

    Returns:
        The ``logging.Logger``.

    Raises:
        ValueError: If ``name`` is outside ``hf_optim``.

    Example:
        ```python
        import hf_optim

        assert hf_optim.logging.get_logger("hf_optim.hub").parent.name == "hf_optim"
        ```
    """
    if name is None:
        name = LIBRARY_NAME
    if name != LIBRARY_NAME and not name.startswith(f"{LIBRARY_NAME}."):
        raise ValueError(f"hf_optim's loggers are named 'hf_optim' or 'hf_optim.*', got {name!r}")
    return logging.getLogger(name)


def get_verbosity() -> int:
    """The level of the ``hf_optim`` logger (``logging.WARNING`` unless changed).

    Returns:
        A ``logging`` level (an int).
    """
    return logging.getLogger(LIBRARY_NAME).getEffectiveLevel()


def set_verbosity(level: int | str) -> None:
    """Set the level of every hf_optim logger: a ``logging`` level or one of debug/info/warning/error/critical.

    Args:
        level: A ``logging`` level, or its name (case-insensitive).

    Raises:
        ValueError: If ``level`` is an unknown name.
        TypeError: If ``level`` is neither an int nor a str.

    Example:
        ```python
        import hf_optim

        hf_optim.logging.set_verbosity("error")
        hf_optim.logging.set_verbosity("warning")
        ```
    """
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"level must be one of {', '.join(_LEVELS)} or a logging level, got {level!r}")
        level = _LEVELS[level.lower()]
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int or a str, got {type(level).__name__}")
    logging.getLogger(LIBRARY_NAME).setLevel(level)


def set_verbosity_debug() -> None:
    """Show everything hf_optim logs, routine messages included."""
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    """Show hf_optim's informational messages (files saved, checkpoints loaded) and above."""
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    """Show warnings and errors only (the default)."""
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    """Show errors only."""
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Remove hf_optim's stderr handler (records still propagate to the root logger)."""
    logging.getLogger(LIBRARY_NAME).removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Put hf_optim's stderr handler back."""
    logger = logging.getLogger(LIBRARY_NAME)
    if _default_handler not in logger.handlers:
        logger.addHandler(_default_handler)


def disable_propagation() -> None:
    """Stop hf_optim's records from reaching the root logger's handlers (only hf_optim's handler prints them)."""
    logging.getLogger(LIBRARY_NAME).propagate = False


def enable_propagation() -> None:
    """Let hf_optim's records reach the root logger's handlers (the default)."""
    logging.getLogger(LIBRARY_NAME).propagate = True


_configure_library_root_logger()
