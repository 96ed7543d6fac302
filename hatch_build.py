"""Hatchling build hook: install hf_optim's interpreter-start hook with the wheel (also editable wheels).

The wheel gets two extra top-level files in site-packages:

- ``hf_optim_autoload.pth`` (one line, ``import _hf_optim_autoload``), run by ``site`` at interpreter start;
- ``_hf_optim_autoload.py``, a copy of ``hf_optim/_autoload.py``. It lives outside the package so that start-up
  does not execute ``hf_optim/__init__.py`` (which imports torch); it only registers a ``sys.meta_path`` finder.
- ``_hf_optim_console.py``, a copy of ``hf_optim/_console.py``: the ``hf-optim`` script's entry point, outside
  the package for the same reason (``hf-optim --version`` without importing torch).

Editable installs (``pip install -e .``) need the same two files in site-packages: hatchling's editable wheel
only adds the project to ``sys.path``, so they go into ``force_include_editable``. After editing
``hf_optim/_autoload.py``, reinstall (``pip install -e . --no-deps``) to refresh the copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_NAME = "hf_optim_autoload.pth"
#: top-level module in site-packages -> its source in the package
MODULES = {
    "_hf_optim_autoload.py": os.path.join("hf_optim", "_autoload.py"),
    "_hf_optim_console.py": os.path.join("hf_optim", "_console.py"),
}


class AutoloadBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        # A copy from outside the project: hatchling treats a force-included source inside the project as moved
        # (its own path is left out of the wheel), which would drop hf_optim/_autoload.py from the package.
        self._tmp = tempfile.mkdtemp(prefix="hf_optim_build_")
        files = {os.path.join(self.root, PTH_NAME): PTH_NAME}
        for name, source in MODULES.items():
            shutil.copyfile(os.path.join(self.root, source), os.path.join(self._tmp, name))
            files[os.path.join(self._tmp, name)] = name
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {}).update(files)

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
