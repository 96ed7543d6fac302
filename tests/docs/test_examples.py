"""Every ```python block of the docs pages runs: each page's blocks in order, in one fresh namespace, on CPU.

A page's blocks share a namespace seeded by the page's prelude (``PRELUDES``): a tiny ``model``, its ``loader``, and
the working directory set to a temporary folder, so paths like ``"ckpt"`` land there. A block that needs a GPU,
the real Hub or a multi-process launch is preceded by ``<!-- skip: reason -->`` and reported as skipped with that
reason. The ``Example:`` blocks of the public names' docstrings run too. Pages with Hub examples run against the test-suite's local Hub (``HF_ENDPOINT`` points at it).
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"(?:<!--\s*skip:\s*(?P<skip>.*?)\s*-->\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)

_TINY = """
import hf_optim
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
loader = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(4)]
"""
# Per-page setup run before the page's first block (the names its examples assume exist).
_TOKENS = """
import hf_optim
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
loader = torch.utils.data.DataLoader(
    [{"input_ids": torch.randint(0, 10, (5,)), "labels": torch.randint(0, 10, (5,))} for _ in range(8)], batch_size=2
)
"""
_TRAINER = """
import hf_optim
import torch
from transformers import TrainingArguments


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


torch.manual_seed(0)
model = TinyModel()
train_dataset = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(8)]
"""
# Per-page setup run before the page's first block (the names its examples assume exist).
PRELUDES: dict[str, str] = {
    "quickstart.md": _TINY,
    "optimizers.md": _TINY,
    "schedules.md": _TINY,
    "accumulation.md": _TOKENS
    + "import types\nimport torch.nn.functional as F\n"
    + "micro_batches = [types.SimpleNamespace(x=b['input_ids'], y=b['labels']) for b in loader]\n"
    + "optimizer = hf_optim.create_optimizer('adamw_hf', model, lr=1e-3)\n",
    "state.md": _TINY
    + "optimizer = hf_optim.create_optimizer('adamw_hf', model, lr=1e-3)\n"
    + "scheduler = hf_optim.get_scheduler('linear', optimizer, num_warmup_steps=1, num_training_steps=10)\n"
    + "accumulator = hf_optim.GradientAccumulator()\n"
    # the checkpoint folder the page downloads, on the local Hub
    + "hf_optim.push_state_to_hub('me/run-1', optimizer, scheduler, subfolder='checkpoint-500')\n",
    "hub.md": _TINY,
    "migrating.md": _TINY
    + "grouped_parameters = list(model.parameters())\nnum_train_optimization_steps = num_steps = 100\n"
    + "from transformers import TrainingArguments\n",
    "trainer.md": _TRAINER,
    "accelerate.md": _TOKENS + "def train(accelerator):\n    return None\n",
    "fsdp2.md": _TINY,
    "deepspeed.md": _TINY,
}
# Pages whose examples talk to a Hub: they run against the local one.
HUB_PAGES = {"quickstart.md", "state.md", "hub.md"}


def _blocks(page: Path) -> list[tuple[str, str | None, int]]:
    text = page.read_text(encoding="utf-8")
    return [(m["code"], m["skip"], text.count("\n", 0, m.start("code")) + 1) for m in BLOCK.finditer(text)]


PAGES = sorted(p.name for p in DOCS.glob("*.md") if _blocks(p))


def test_every_page_with_examples_has_a_prelude():
    assert set(PAGES) <= set(PRELUDES), sorted(set(PAGES) - set(PRELUDES))


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons: a page's Accelerator must not leak into other tests."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch, request):
    if page in HUB_PAGES:
        request.getfixturevalue("hub_server")
    monkeypatch.chdir(tmp_path)
    _reset_accelerate()
    request.addfinalizer(_reset_accelerate)
    namespace: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    exec(compile(PRELUDES[page], f"<prelude {page}>", "exec"), namespace)
    skipped = []
    for code, skip, line in _blocks(DOCS / page):
        if skip:
            skipped.append(f"line {line}: {skip}")
            continue
        # the file name and line make a failing example's traceback point at the page
        exec(compile("\n" * (line - 1) + code, str(DOCS / page), "exec"), namespace)
    if skipped:
        pytest.skip("ran the other blocks; skipped " + "; ".join(skipped))


def _docstring_examples() -> dict[str, tuple[str, str | None]]:
    """Each public name's ``Example:`` code, and the reason if a ``<!-- skip: reason -->`` marks it."""
    import inspect

    import hf_optim

    documented = {}
    for name in sorted(set(hf_optim.__all__) - {"__version__"}):
        documented[name] = getattr(hf_optim, name)
        if inspect.ismodule(documented[name]):  # hf_optim.logging: its functions too
            module = documented[name]
            documented.update({f"{name}.{member}": getattr(module, member) for member in module.__all__})
    examples = {}
    for name, obj in documented.items():
        doc = inspect.getdoc(obj) or ""
        blocks = re.findall(
            r"^(?:[ \t]*<!--\s*skip:\s*(.*?)\s*-->\n)?([ \t]*)```python\n(.*?)^\2```", doc, flags=re.M | re.S
        )
        if blocks:
            code = "\n".join(textwrap.dedent(block) for _, _, block in blocks)
            examples[name] = (code, "; ".join(skip for skip, _, _ in blocks if skip) or None)
    return examples


DOCSTRING_EXAMPLES = _docstring_examples()


def _uses_the_hub(name: str) -> bool:
    """The names of ``hf_optim.hub``: their examples run against the local Hub."""
    import hf_optim
    import hf_optim.hub

    return "." not in name and getattr(hf_optim, name) in (
        getattr(hf_optim.hub, n) for n in hf_optim.hub.__all__
    )


@pytest.mark.parametrize("name", sorted(DOCSTRING_EXAMPLES))
def test_docstring_example_runs(name, tmp_path, monkeypatch, request):
    code, skip = DOCSTRING_EXAMPLES[name]
    if skip:
        pytest.skip(skip)
    if _uses_the_hub(name):
        request.getfixturevalue("hub_server")
    monkeypatch.chdir(tmp_path)
    _reset_accelerate()
    request.addfinalizer(_reset_accelerate)
    namespace: dict[str, object] = {"__name__": f"docstring_{name}"}
    exec(compile(_TINY, "<prelude>", "exec"), namespace)
    exec(compile(code, f"<docstring of hf_optim.{name}>", "exec"), namespace)
