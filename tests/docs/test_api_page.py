"""The API reference page documents every public name: one ``::: dotted.path`` directive per name in ``__all__``,
each path naming the object that ``hf_optim.<name>`` is. A directive whose ``heading:`` option gives another name
documents that name (the registry functions are methods of the default registry)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import hf_optim

API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _directives() -> dict[str, str]:
    found = re.findall(
        r"^::: ([\w.]+)\n(?:    options:\n(?:      .*\n)*?      heading: (\w+)\n)?",
        API_PAGE.read_text(encoding="utf-8"),
        flags=re.M,
    )
    return {heading or path.rsplit(".", 1)[1]: path for path, heading in found}


def _resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        return _resolve(module).__dict__[name]  # type: ignore[attr-defined]


def test_every_public_name_is_documented_once():
    public = set(hf_optim.__all__) - {"__version__"}
    documented = _directives()
    assert sorted(public - set(documented)) == []
    assert sorted(set(documented) - public) == []


def test_each_directive_names_the_public_object():
    for name, path in _directives().items():
        public = getattr(hf_optim, name)
        assert _resolve(path) is getattr(public, "__func__", public), path  # a bound method: its function
