"""mkdocs hooks: content generated from the real code at build time.

- ``<!-- schedule-pictures -->`` in a page becomes a picture of every schedule: the registry's (``list_schedulers``
  + ``get_scheduler``), pytorch-pretrained-bert's ``LRSchedule`` classes and pytorch-transformers 1.x's classes,
  each drawn by stepping the real object (matplotlib, Agg backend).
- Docstrings cross-reference with Sphinx roles (``:func:`hf_optim.save_state```), which Python's own ``help()``
  and IDEs show as they are; in the API reference they become code, linked to the object's entry when the page
  documents it.
- The committed command line reference (docs/cli.md, written by ``scripts/cli_reference.py``) is checked against
  the argparse parsers: a stale page fails the build.
"""

from __future__ import annotations

import html as html_lib
import importlib.util
import inspect
import io
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

WARMUP, TOTAL = 10, 100
# Extra arguments a registry schedule needs beyond warmup / total steps, to draw a representative curve.
EXTRA_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr": 0.1},
    "cosine_with_restarts": {"num_cycles": 3},
    "warmup_stable_decay": {"num_decay_steps": 30},
    "polynomial": {"power": 2.0, "lr_end": 0.0},
}
IMG_DIR = "img/schedules"

_pictures: dict[str, list[tuple[str, str]]] = {}  # section -> [(title, image path)]


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _torch_curve(scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
    optimizer = scheduler.optimizer
    lrs = []
    for _ in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _png(title: str, lrs: list[float], xlabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(3.4, 2.4), dpi=100)  # two pictures side by side
    ax.plot(range(len(lrs)), lrs, color="#ff6f00")
    ax.set_title(textwrap.fill(title, 44), fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("lr multiplier", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _registry_curves() -> list[tuple[str, str, list[float]]]:
    import hf_optim

    out = []
    for name in hf_optim.list_schedulers():
        kwargs = EXTRA_KWARGS.get(name, {})
        scheduler = hf_optim.get_scheduler(
            name, _optimizer(), num_warmup_steps=WARMUP, num_training_steps=TOTAL, **kwargs
        )
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        out.append((name, f'get_scheduler("{name}"{", " + args if args else ""})', _torch_curve(scheduler)))
    return out


def _pretrained_bert_curves() -> list[tuple[str, str, list[float]]]:
    from hf_optim.schedules import pretrained_bert

    classes = {cls for cls in pretrained_bert.SCHEDULES.values()}
    classes |= {
        obj
        for obj in vars(pretrained_bert).values()
        if inspect.isclass(obj)
        and issubclass(obj, pretrained_bert.LRSchedule)
        and not inspect.isabstract(obj)
    }
    out = []
    for cls in sorted(classes, key=lambda c: c.__name__):
        schedule = cls(warmup=WARMUP / TOTAL, t_total=TOTAL)
        lrs = [schedule.get_lr(step, nowarn=True) for step in range(TOTAL)]
        out.append((f"ppb_{cls.__name__}", f"{cls.__name__}(warmup=0.1, t_total=100)", lrs))
    return out


def _pytorch_transformers_curves() -> list[tuple[str, str, list[float]]]:
    from hf_optim.schedules import pytorch_transformers

    out = []
    for name in sorted(vars(pytorch_transformers)):
        cls = getattr(pytorch_transformers, name)
        if not (inspect.isclass(cls) and cls.__module__ == pytorch_transformers.__name__):
            continue
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in (("warmup_steps", WARMUP), ("t_total", TOTAL)) if k in params}
        if "cycles" in params and "Restarts" in name:
            kwargs["cycles"] = 3.0
        scheduler = cls(_optimizer(), **kwargs)
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        out.append((f"pt_{name}", f"{name}({args})", _torch_curve(scheduler)))
    return out


def on_files(files, config):
    """Draw every schedule into the site as generated PNG files."""
    _pictures.clear()
    sections = {
        "transformers schedules (the registry: `hf_optim.get_scheduler`)": _registry_curves(),
        "pytorch-pretrained-bert 0.6 (`hf_optim.schedules.pretrained_bert`), x = step of t_total": (
            _pretrained_bert_curves()
        ),
        "pytorch-transformers 1.x (`hf_optim.schedules.pytorch_transformers`)": _pytorch_transformers_curves(),
    }
    for section, curves in sections.items():
        entries = _pictures.setdefault(section, [])
        for key, title, lrs in curves:
            path = f"{IMG_DIR}/{key}.png"
            files.append(File.generated(config, path, content=_png(title, lrs, "step")))
            entries.append((title, path))
    return files


def _cli_reference() -> str:
    """What ``scripts/cli_reference.py`` writes into docs/cli.md today."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render()


def _schedule_markdown(page) -> str:
    depth = page.file.src_uri.count("/")
    prefix = "../" * depth
    parts = []
    for section, entries in _pictures.items():
        parts.append(f"### {section}\n")
        for title, path in entries:
            parts.append(f"![{title}]({prefix}{path})")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if "<!-- schedule-pictures -->" in markdown:
        markdown = markdown.replace("<!-- schedule-pictures -->", _schedule_markdown(page))
    if page.file.src_uri == "cli.md" and markdown != _cli_reference():
        raise PluginError(
            "docs/cli.md differs from the hf-optim parsers: run python scripts/cli_reference.py"
        )
    return markdown


# What mkdocstrings makes of ``:func:`~hf_optim.state.save_state``` in a docstring: the role, then inline code.
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):<code>(~?)([^<]+)</code>")
_ANCHOR = re.compile(r'id="(hf_optim\.[\w.]+)"')


def on_page_content(html, page, config, files):
    """Sphinx roles in rendered docstrings: inline code, linked when this page has the object's entry."""
    if ":<code>" not in html:
        return html
    anchors: dict[str, str] = {}
    for anchor in _ANCHOR.findall(html):
        anchors.setdefault(anchor.rsplit(".", 1)[-1], anchor)

    def link(match: re.Match[str]) -> str:
        target = html_lib.unescape(match[2]).strip()
        shown = target.rsplit(".", 1)[-1] if match[1] else target
        code = f"<code>{html_lib.escape(shown)}</code>"
        anchor = anchors.get(target.rsplit(".", 1)[-1].removesuffix("()"))
        return f'<a href="#{anchor}">{code}</a>' if anchor else code

    return _ROLE.sub(link, html)
