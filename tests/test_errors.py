"""The error-type policy of hf_optim.errors: wrong type -> TypeError, bad value -> ValueError.

Two checks that can fail: a scan of the package's source for ``raise ValueError(...)`` whose message is about a
type (it says "must be a str / mapping / tensor ..." or reports ``type(x).__name__`` as what it got), and a table of
public entry points called with an argument of the wrong type.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import hf_optim

PACKAGE = Path(hf_optim.__file__).resolve().parent

TYPE_PHRASE = re.compile(
    r"must be (a|an) (str\b|string|bool\b|boolean|int\b|integer|dict\b|mapping|callable|class\b|list\b|tuple\b|"
    r"real number|number\b|float\b|sequence|JSON object|tensor\b|torch\.nn\.Module|torch\.optim)",
    re.IGNORECASE,
)

# ValueErrors whose message matches the scan but are about values, with the reason.
ALLOWED = {
    # a torch.dtype that is not floating point is a bad value; the check covers non-dtypes in the same test
    ("accumulation.py", "dtype must be a floating-point torch.dtype"),
    # type(...) names the scheduler in the message; the error is about which optimizer it drives
    ("integrations/accelerate/checkpoint.py", "drives an optimizer that was not prepared"),
    # type(...) names the model in the message; the error is that it has no trainable parameters
    ("param_groups.py", "has no trainable parameters"),
    # a sequence of the wrong length (a value) and a non-sequence share one message
    ("registry/records.py", "must be a sequence of"),
}


def _literal_text(node: ast.AST) -> str:
    return "".join(
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def _reports_a_type(message: ast.AST) -> bool:
    """``... got {type(x).__name__}`` / ``... is a {type(x).__name__}``: the message says what type it got."""
    if not isinstance(message, ast.JoinedStr):
        return False
    for before, after in zip(message.values, message.values[1:], strict=False):
        if (
            isinstance(before, ast.Constant)
            and isinstance(before.value, str)
            and re.search(r"(got|is a|is an)\s*$", before.value)
            and isinstance(after, ast.FormattedValue)
            and any(
                isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "type"
                for n in ast.walk(after.value)
            )
        ):
            return True
    return False


def type_errors_raised_as_value_errors(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name)
                and node.exc.func.id == "ValueError"
                and node.exc.args
            ):
                continue
            message = node.exc.args[0]
            text = _literal_text(message)
            if not (TYPE_PHRASE.search(text) or _reports_a_type(message)):
                continue
            if any(relative == f and phrase in text for f, phrase in ALLOWED):
                continue
            found.append(f"{relative}:{node.lineno}: {text[:80]}")
    return found


def test_no_value_error_is_raised_for_a_wrong_type():
    assert type_errors_raised_as_value_errors(PACKAGE) == []


def test_every_allowed_exception_still_exists():
    """An entry of ALLOWED that no longer matches anything is stale and must go."""
    texts = {
        (path.relative_to(PACKAGE).as_posix(), _literal_text(node.exc.args[0]))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args
    }
    for file, phrase in ALLOWED:
        assert any(f == file and phrase in t for f, t in texts), (file, phrase)


@pytest.mark.parametrize(
    "source",
    [
        'raise ValueError(f"name must be a string, got {name!r}")',
        'raise ValueError(f"state must be a mapping, got {type(state).__name__}")',
        'raise ValueError(f"value is a {type(value).__name__}, not a tensor")',
    ],
)
def test_the_scan_finds_the_pattern(tmp_path, source):
    (tmp_path / "module.py").write_text(f"def f(name, state, value):\n    {source}\n")
    assert len(type_errors_raised_as_value_errors(tmp_path)) == 1


def _params():
    return [torch.nn.Parameter(torch.zeros(2))]


WRONG_TYPES = {
    "AdamW-lr": lambda: hf_optim.AdamW(_params(), lr="1e-3"),
    "AdamW-betas": lambda: hf_optim.AdamW(_params(), betas=0.9),
    "AdamWeightDecay-learning_rate": lambda: hf_optim.AdamWeightDecay(_params(), learning_rate=[1e-3]),
    "BertAdam-schedule": lambda: hf_optim.BertAdam(_params(), lr=0.1, schedule=3),
    "BertAdam-max_grad_norm": lambda: hf_optim.BertAdam(_params(), lr=0.1, max_grad_norm="1"),
    "OpenAIAdam-e": lambda: hf_optim.OpenAIAdam(_params(), lr=0.1, e=None),
    "group_parameters-model": lambda: hf_optim.group_parameters(_params(), weight_decay=0.1),
    "scheduler_from_config": lambda: hf_optim.scheduler_from_config(hf_optim.AdamW(_params()), ["linear"]),
    "register_optimizer-defaults": lambda: hf_optim.register_optimizer("x_y", hf_optim.AdamW, defaults=[1]),
    "register_json_type-cls": lambda: hf_optim.register_json_type(
        "x", name="n", to_json=dict, from_json=dict
    ),
    "GradientAccumulator-load": lambda: hf_optim.GradientAccumulator().load_state_dict([1]),
    "get_polynomial_decay_schedule-optimizer": lambda: hf_optim.get_polynomial_decay_schedule_with_warmup(
        object(), 1, 10
    ),
}


@pytest.mark.parametrize("call", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_public_entry_points_raise_type_error_for_a_wrong_type(call):
    with pytest.raises(TypeError):
        call()
