"""Every public callable of ``hf_optim`` documents itself in the ecosystem's Google style: a summary line, one
``Args:`` entry per parameter of its signature (a class: of ``__init__``), ``Returns:`` unless it returns
``None``, and a runnable ``Example:`` block (run by test_examples.py)."""

from __future__ import annotations

import inspect
import re

import pytest

import hf_optim

SECTION = re.compile(r"^(Args|Returns|Raises|Example|Examples|Note|Notes|Warning|Attributes):\s*$", re.M)


def _public_callables() -> list[str]:
    return sorted(
        name
        for name in set(hf_optim.__all__) - {"__version__"}
        if inspect.isclass(getattr(hf_optim, name)) or inspect.isroutine(getattr(hf_optim, name))
    )


def _sections(doc: str) -> dict[str, str]:
    """Section title -> its body (dedented by the docstring's indentation), for a Google-style docstring."""
    marks = list(SECTION.finditer(doc))
    return {
        m[1]: doc[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(doc)]
        for i, m in enumerate(marks)
    }


def _documented_args(body: str) -> list[str]:
    """The parameter names of an ``Args:`` body: ``name:`` or ``name (type):`` at the entries' indentation."""
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        return []
    indent = len(lines[0]) - len(lines[0].lstrip())
    entries = [line[indent:] for line in lines if len(line) - len(line.lstrip()) == indent]
    return [m[1] for entry in entries if (m := re.match(r"(\*{0,2}\w+)(?: \(.+\))?:", entry))]


def _signature_args(obj: object) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    if inspect.isclass(obj) and not getattr(target, "__module__", "").startswith("hf_optim"):
        return []  # the constructor of a base class outside hf_optim (Exception, transformers.Trainer)
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [prefix.get(p.kind, "") + p.name for p in params]


@pytest.mark.parametrize("name", _public_callables())
def test_public_docstring_has_the_ecosystem_sections(name):
    obj = getattr(hf_optim, name)
    doc = obj.__doc__ or ""
    assert doc.strip(), f"{name} has no docstring"
    sections = _sections(inspect.cleandoc(doc))
    expected_args = _signature_args(obj)
    documented = _documented_args(sections.get("Args", ""))
    assert documented == expected_args, f"{name}: Args {documented} != signature {expected_args}"
    if inspect.isroutine(obj) and inspect.signature(obj).return_annotation not in ("None", None):
        assert sections.get("Returns", "").strip(), f"{name} has no Returns section"
    assert "```python" in sections.get("Example", ""), f"{name} has no runnable Example block"
