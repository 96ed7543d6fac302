"""Fresh interpreters (``subprocess``): import orders, the start-up hook (on / off / failing) and installed files
(hf_optim._autoload with hf_optim.integrations.transformers.bridge.sync)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from tests.integrations.transformers_helpers import (  # noqa: E402
    ROOT,
    start_python,
)

CHECK_NAMES = """
import hf_optim
from transformers import HfArgumentParser, Trainer, TrainingArguments
args = TrainingArguments(output_dir="out", optim="adamw_hf", report_to=[], use_cpu=True)
choices = next(a for a in HfArgumentParser(TrainingArguments)._actions if a.dest == "optim").choices
cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
assert cls is hf_optim.AdamW, cls
assert "adam_weight_decay" in choices and "adamw_hf" in choices
print("OK", args.optim.value, sorted(kwargs))
"""

UNMODIFIED_SCRIPT = """
import sys
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=1, intermediate_size=16))
optimizer = Trainer(model=model, args=args).create_optimizer()
print("OPTIMIZER", type(optimizer).__module__ + "." + type(optimizer).__qualname__, optimizer.param_groups[0]["eps"])
"""

NEVER_RAISES = """
import sys
sys.modules["hf_optim.integrations.transformers"] = None  # importing it now raises ImportError
from transformers import TrainingArguments
TrainingArguments(output_dir="out", optim="adamw_torch", report_to=[])
try:
    TrainingArguments(output_dir="out", optim="adamw_hf", report_to=[])
except ValueError:
    print("NOT-REGISTERED")
"""

HOOK_STATE = """
import json, sys
print(json.dumps({
    "hook": "_hf_optim_autoload" in sys.modules,
    "finder": any(getattr(f, "_hf_optim_autoload_finder", False) for f in sys.meta_path),
    "heavy": sorted(m for m in sys.modules
                    if m.split(".")[0] in ("torch", "transformers", "hf_optim", "numpy", "huggingface_hub", "logging")),
}))
"""


IMPORT_HF_OPTIM = """
import json, sys
import hf_optim
before = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "accelerate"))
import transformers
print(json.dumps({"before": before, "lazy_trainer": transformers.Trainer in hf_optim.Trainer.__mro__}))
"""


class FreshInterpreters:
    """Starts every fresh-interpreter check at once (they mostly wait on imports) and hands out the results."""

    def __init__(self, directory: Path) -> None:
        script = directory / "train.py"
        script.write_text(UNMODIFIED_SCRIPT)
        unmodified = [
            str(script),
            "--output_dir",
            str(directory / "out"),
            "--optim",
            "adamw_hf",
            "--adam_epsilon",
            "1e-7",
            "--report_to",
            "none",
            "--use_cpu",
        ]
        cases = {
            "hf_optim-first": (["-c", "import hf_optim\n" + CHECK_NAMES], False),
            "transformers-first": (["-c", "import transformers.trainer\n" + CHECK_NAMES], False),
            "unmodified-autoload": (unmodified, True),
            "unmodified-no-autoload": (unmodified, False),
            "never-raises": (["-c", NEVER_RAISES], True),
            "hook-state": (["-c", HOOK_STATE], True),
            "hook-state-disabled": (["-c", HOOK_STATE], False),
            "import-hf_optim": (["-c", IMPORT_HF_OPTIM], True),
        }
        self._processes = {
            name: start_python(args, autoload=autoload, cwd=directory)
            for name, (args, autoload) in cases.items()
        }
        self._results: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._results:
            process = self._processes[name]
            stdout, stderr = process.communicate(timeout=600)
            self._results[name] = subprocess.CompletedProcess(
                process.args, process.returncode, stdout, stderr
            )
        return self._results[name]

    def close(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    runs = FreshInterpreters(tmp_path_factory.mktemp("fresh"))
    yield runs
    runs.close()


@pytest.mark.parametrize("first", ["hf_optim-first", "transformers-first"])
def test_either_import_order_works_without_autoload(fresh, first):
    result = fresh[first]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK adamw_hf ['betas', 'eps', 'lr', 'weight_decay']"), result.stdout


def test_unmodified_script_with_autoload(fresh):
    """A script that never imports hf_optim gets --optim adamw_hf and hf_optim's AdamW from Trainer."""
    result = fresh["unmodified-autoload"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OPTIMIZER hf_optim.optimizers.adamw.AdamW 1e-07" in result.stdout


def test_unmodified_script_with_autoload_disabled(fresh):
    result = fresh["unmodified-no-autoload"]
    assert result.returncode == 2
    assert "invalid choice: 'adamw_hf'" in result.stderr


def test_startup_hook_is_installed_and_imports_nothing_heavy(fresh):
    assert json.loads(fresh["hook-state"].stdout) == {"hook": True, "finder": True, "heavy": []}
    assert json.loads(fresh["hook-state-disabled"].stdout) == {"hook": True, "finder": False, "heavy": []}


def test_startup_hook_never_raises(fresh):
    """A broken integration (here: not importable) must not break importing transformers."""
    result = fresh["never-raises"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "NOT-REGISTERED"
    assert "Traceback" not in result.stderr


def test_import_hf_optim_does_not_import_transformers(fresh):
    result = fresh["import-hf_optim"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"before": [], "lazy_trainer": True}


def test_install_puts_the_hook_in_site_packages():
    """`pip install [-e] .` (hatch_build.py) installs the .pth and the top-level copy of hf_optim/_autoload.py."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    pth = purelib / "hf_optim_autoload.pth"
    module = purelib / "_hf_optim_autoload.py"
    assert pth.is_file(), f"{pth} missing: reinstall with `pip install -e . --no-deps`"
    assert pth.read_text().strip() == "import _hf_optim_autoload"
    assert module.read_bytes() == (ROOT / "hf_optim" / "_autoload.py").read_bytes(), (
        f"{module} is stale: reinstall with `pip install -e . --no-deps`"
    )


def test_wheel_ships_the_package_module_and_the_top_level_hook(tmp_path):
    """The regular wheel holds ``hf_optim/_autoload.py`` and its top-level copy beside the ``.pth``."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_optim-*.whl")
    with zipfile.ZipFile(wheel) as z:
        source = (ROOT / "hf_optim" / "_autoload.py").read_bytes()
        assert z.read("hf_optim/_autoload.py") == source
        assert z.read("_hf_optim_autoload.py") == source
        assert z.read("hf_optim_autoload.pth").decode().strip() == "import _hf_optim_autoload"
        assert z.read("_hf_optim_console.py") == (ROOT / "hf_optim" / "_console.py").read_bytes()
        entry_points = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "hf-optim = _hf_optim_console:main" in z.read(entry_points).decode()
