"""Packaging facts a user relies on: the license text ships and matches what the metadata declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
