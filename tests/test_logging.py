"""hf_optim.logging: the library logger, its verbosity, its handler, and what an application sees (subprocesses,
so that the root logger starts unconfigured)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_optim
from hf_optim import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != hf_logging.ENV_VERBOSITY}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ, cwd=ROOT
    )


@pytest.fixture
def restore_level():
    library = logging.getLogger("hf_optim")
    level = library.level
    yield
    library.setLevel(level)


def test_set_and_get_verbosity(restore_level):
    for setter, level in (
        (hf_logging.set_verbosity_debug, logging.DEBUG),
        (hf_logging.set_verbosity_info, logging.INFO),
        (hf_logging.set_verbosity_error, logging.ERROR),
        (hf_logging.set_verbosity_warning, logging.WARNING),
    ):
        setter()
        assert hf_logging.get_verbosity() == level
        assert logging.getLogger("hf_optim.registry").getEffectiveLevel() == level
    hf_logging.set_verbosity("error")
    assert hf_logging.get_verbosity() == logging.ERROR
    with pytest.raises(ValueError, match="level"):
        hf_logging.set_verbosity("loud")


def test_get_logger_stays_under_hf_optim():
    assert hf_logging.get_logger() is logging.getLogger("hf_optim")
    assert hf_logging.get_logger("hf_optim.registry") is logging.getLogger("hf_optim.registry")
    with pytest.raises(ValueError, match="hf_optim"):
        hf_logging.get_logger("transformers")
    assert hf_optim.logging is hf_logging


IMPORT_AND_WARN = """
import logging, sys
{setup}
import hf_optim
root = logging.getLogger()
print(len(root.handlers), logging.getLevelName(root.level), logging.getLevelName(hf_optim.logging.get_verbosity()))
logging.getLogger("hf_optim.registry").warning("careful")
logging.getLogger("hf_optim.registry").info("routine")
"""


def test_import_leaves_the_root_logger_alone_and_warnings_print_once_with_a_prefix():
    result = python(IMPORT_AND_WARN.format(setup=""))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "WARNING", "WARNING"]  # root untouched; hf_optim at WARNING
    assert result.stderr.splitlines() == ["[hf_optim] WARNING: careful"]


def test_under_basic_config_records_appear_once_in_the_application_format():
    setup = "logging.basicConfig(level=logging.INFO, format='APP %(name)s %(message)s')"
    result = python(IMPORT_AND_WARN.format(setup=setup))
    assert result.returncode == 0, result.stderr
    # INFO is below hf_optim's default verbosity: only the warning, once, through the application's handler
    assert result.stderr.splitlines() == ["APP hf_optim.registry careful"]


def test_environment_variable_sets_the_verbosity():
    result = python(IMPORT_AND_WARN.format(setup=""), HF_OPTIM_VERBOSITY="info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "WARNING", "INFO"]
    assert result.stderr.splitlines() == ["[hf_optim] WARNING: careful", "[hf_optim] INFO: routine"]


TRAINER_NAMES = """
import logging
logging.basicConfig(level=logging.DEBUG if {debug} else logging.INFO, format="%(name)s: %(message)s")
import hf_optim
{verbosity}
from transformers import TrainingArguments
for _ in range(3):
    TrainingArguments(output_dir="out", lr_scheduler_type="cosine", report_to=[], use_cpu=True)
    hf_optim.register_scheduler("my_schedule_" + str(_), hf_optim.get_cosine_schedule_with_warmup)
"""


def test_shared_schedule_names_are_not_announced_at_info():
    result = python(TRAINER_NAMES.format(debug=False, verbosity=""))
    assert result.returncode == 0, result.stderr
    assert "hf_optim" not in result.stderr


def test_shared_schedule_names_are_noted_once_each_at_debug():
    result = python(TRAINER_NAMES.format(debug=True, verbosity="hf_optim.logging.set_verbosity_debug()"))
    assert result.returncode == 0, result.stderr
    notes = [
        line for line in result.stderr.splitlines() if line.startswith("hf_optim.") and "'cosine'" in line
    ]
    assert len(notes) == 1, result.stderr
    assert "keeps its own entry" in notes[0] and "same learning rates" in notes[0]
