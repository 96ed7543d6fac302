"""Folders built once per test run and shared by every xdist worker (the first to ask builds, the others wait for
it under a file lock): for what is costly to make (multi-process saves, batches of command lines, a Trainer run)
and only read afterwards. Tests copy what they change."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def once_per_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]
) -> Path:
    """The folder ``name`` of this run, made by ``build(folder)`` if no worker made it yet."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    out, complete = root / name, root / f"{name}.complete"
    with FileLock(str(root / f"{name}.lock")):
        if not complete.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            complete.touch()
    return out
