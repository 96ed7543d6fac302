"""``HF_OPTIM_LEGACY_IMPORTS=1``: transformers' removed optimizer names resolve to hf_optim's, lazily; off by default.

Each check runs in a fresh interpreter. The start-up hook is this checkout's ``hf_optim/_autoload.py`` imported as
``_hf_optim_autoload``, exactly what the installed ``hf_optim_autoload.pth`` runs (a copy installed earlier in
site-packages, and its finder, are removed first so that the version under test is the one in effect).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]

STARTUP = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_hf_optim_autoload_finder", False)]
sys.modules.pop("_hf_optim_autoload", None)
sys.path.insert(0, {hook_dir!r})
import _hf_optim_autoload  # what hf_optim_autoload.pth runs at interpreter start
sys.path.pop(0)
"""

ENABLED = """
import json, sys
import transformers
report = {"hf_optim_after_import": "hf_optim" in sys.modules, "torch_after_import": "torch" in sys.modules}
from transformers import AdamW
report["hf_optim_after_access"] = "hf_optim" in sys.modules
from transformers.optimization import AdamW as OptimizationAdamW
from transformers import AdamWeightDecay, GradientAccumulator
import hf_optim, torch
try:
    from transformers import AdamW as Fallback
except ImportError:
    from torch.optim import AdamW as Fallback
from transformers import Trainer  # transformers' own names are untouched
try:
    from transformers import NotAName
except ImportError:
    report["unknown_name_raises"] = True
report.update(
    adamw=AdamW is hf_optim.AdamW,
    optimization_adamw=OptimizationAdamW is hf_optim.AdamW,
    adam_weight_decay=AdamWeightDecay is hf_optim.AdamWeightDecay,
    gradient_accumulator=GradientAccumulator is hf_optim.GradientAccumulator,
    fallback=Fallback is hf_optim.AdamW,
    trainer=Trainer.__module__,
)
print(json.dumps(report))
"""

DISABLED = """
import json, sys
import transformers, transformers.optimization
report = {}
try:
    from transformers import AdamW
except ImportError as err:
    report["top_level"] = str(err)
try:
    from transformers.optimization import AdamW
except ImportError as err:
    report["optimization"] = str(err)
try:
    from transformers import AdamW
except ImportError:
    from torch.optim import AdamW
import torch
report["fallback"] = AdamW is torch.optim.AdamW
from transformers import Trainer  # transformers' own names are untouched
report["trainer"] = Trainer.__module__
print(json.dumps(report))
"""

LATE_HF_OPTIM = """
import json
import transformers
import hf_optim  # transformers was imported before any hook: importing hf_optim installs the names
from transformers import AdamW
from transformers.optimization import AdamW as OptimizationAdamW
print(json.dumps({"adamw": AdamW is hf_optim.AdamW, "optimization": OptimizationAdamW is hf_optim.AdamW}))
"""


def start(code: str, *, legacy: bool, startup: bool, hook_dir: Path) -> subprocess.Popen:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_OPTIM_LEGACY_IMPORTS", "HF_OPTIM_DISABLE_AUTOLOAD")
    }
    if legacy:
        env["HF_OPTIM_LEGACY_IMPORTS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    prefix = (
        STARTUP.format(hook_dir=str(hook_dir))
        if startup
        else (
            "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '_hf_optim_autoload_finder', False)]\n"
        )
    )
    return subprocess.Popen(
        [sys.executable, "-c", prefix + code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hook_dir = tmp_path_factory.mktemp("hook")
    shutil.copyfile(ROOT / "hf_optim" / "_autoload.py", hook_dir / "_hf_optim_autoload.py")
    cases = {
        "enabled": (ENABLED, True, True),
        "disabled": (DISABLED, False, True),
        "late": (LATE_HF_OPTIM, True, False),
    }
    processes = {
        name: start(code, legacy=legacy, startup=startup, hook_dir=hook_dir)
        for name, (code, legacy, startup) in cases.items()
    }
    out = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_removed_names_resolve_to_hf_optim_lazily(results):
    assert results["enabled"] == {
        "hf_optim_after_import": False,
        "torch_after_import": False,
        "hf_optim_after_access": True,
        "unknown_name_raises": True,
        "adamw": True,
        "optimization_adamw": True,
        "adam_weight_decay": True,
        "gradient_accumulator": True,
        "fallback": True,
        "trainer": "transformers.trainer",
    }


def test_without_the_variable_the_import_error_says_where_the_name_went(results):
    """Still an ImportError (so ``try: from transformers import AdamW / except ImportError`` fallbacks work), and
    the message names both ways out."""
    disabled = results["disabled"]
    for where in ("top_level", "optimization"):
        assert "from hf_optim import AdamW" in disabled[where], disabled[where]
        assert "HF_OPTIM_LEGACY_IMPORTS=1" in disabled[where], disabled[where]
    assert disabled["fallback"] is True
    assert disabled["trainer"] == "transformers.trainer"


def test_importing_hf_optim_after_transformers_installs_the_names(results):
    assert results["late"] == {"adamw": True, "optimization": True}
