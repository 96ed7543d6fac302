"""Packaging facts a user relies on: the license text ships and matches what the metadata declares, one version,
the import layers, the public names and what importing them costs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_the_declared_apache_license():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_version_is_written_once():
    """pyproject reads the version from hf_optim/__init__.py; nothing else in the package spells one out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == "hf_optim/__init__.py"
    import hf_optim

    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", hf_optim.__version__)
    written = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "hf_optim").rglob("*.py")
        if re.search(r"__version__\s*=|metadata\.version\(\s*['\"]hf_optim", path.read_text())
    ]
    assert written == ["hf_optim/__init__.py"]


def test_checkpoints_record_the_package_version(tmp_path):
    import torch

    import hf_optim

    p = torch.nn.Parameter(torch.zeros(2))
    hf_optim.save_state(tmp_path, hf_optim.AdamW([p]))
    from safetensors import safe_open

    with safe_open(tmp_path / hf_optim.OPTIMIZER_NAME, "pt") as f:
        metadata = "".join(f.metadata().values())
    assert f'"hf_optim": "{hf_optim.__version__}"' in metadata


def test_every_module_is_in_an_import_layer():
    """The import-linter contract names every top-level module and package of hf_optim, so none escapes it."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    top_level = {
        f"hf_optim.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / "hf_optim").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    assert top_level - layered == set()
    assert layered - top_level == set()


def test_public_modules_declare_all():
    """Every public module lists its public names in ``__all__``, and each listed name exists."""
    import importlib

    missing, broken = [], []
    for path in sorted((ROOT / "hf_optim").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[:2] in (
            ("hf_optim", "cli"),
            ("hf_optim", "integrations"),
        ):
            continue  # private modules; the command-line modules and integrations are covered by their owners
        module = importlib.import_module(".".join(parts))
        if not hasattr(module, "__all__"):
            missing.append(module.__name__)
            continue
        broken += [f"{module.__name__}.{n}" for n in module.__all__ if not hasattr(module, n)]
    assert missing == [] and broken == []


LAZY_NAMES = """
import sys, threading, hf_optim, hf_optim.hub_server.cli
print("torch" in sys.modules)
# threads that reach for names at once, each name's first use: every one gets the module's object
names = [n for n in hf_optim.__all__ if n not in ("Trainer", "TrainerMixin")]  # no transformers here
errors, barrier = [], threading.Barrier(16)
def use(first):
    barrier.wait()
    for name in names[first:] + names[:first]:
        try:
            getattr(hf_optim, name)
        except Exception as err:
            errors.append(repr(err))
threads = [threading.Thread(target=use, args=(i * len(names) // 16,)) for i in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors or "no-errors", hf_optim.AdamW.__module__, hf_optim.state.__name__, "torch" in sys.modules)
print(hasattr(hf_optim, "cli"), hasattr(hf_optim, "state.io"), "registry" in dir(hf_optim))
"""


def test_import_hf_optim_imports_torch_only_when_a_name_is_used():
    """``import hf_optim`` and the local Hub server stay light (no torch); the first public name used imports
    its module, also from several threads at once, and the public subpackages are attributes as after an eager
    import (nothing else is)."""
    done = subprocess.run([sys.executable, "-c", LAZY_NAMES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "False",
        "no-errors",
        "hf_optim.optimizers.adamw",
        "hf_optim.state",
        "True",
        "False",
        "False",
        "True",
    ]


def test_hf_optim_modules_import_no_lazy_name_of_hf_optim():
    """A module of hf_optim takes what it needs from the submodule that defines it, not from ``hf_optim``'s lazy
    names: the first use of a lazy name holds a lock while it imports, which a thread importing such a module
    could then wait for."""
    import ast

    import hf_optim

    lazy = set(hf_optim.__all__) - {"__version__", "logging"}
    found = []
    for path in sorted((ROOT / "hf_optim").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "hf_optim" and node.level == 0:
                found += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name in lazy]
    assert found == []


def test_public_names_are_the_ones_type_checkers_see():
    """Every name in ``hf_optim.__all__`` is imported under ``TYPE_CHECKING`` in hf_optim/__init__.py from the
    module that the lazy lookup takes it from, and nothing else is."""
    import ast
    import importlib

    import hf_optim

    tree = ast.parse((ROOT / "hf_optim" / "__init__.py").read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    )
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert set(seen) == set(hf_optim.__all__) - {"__version__", "logging"}
    for name, module in seen.items():
        assert getattr(hf_optim, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_optim.not_a_name  # noqa: B018
