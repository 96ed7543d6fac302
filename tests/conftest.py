"""Test-suite setup: an isolated Hugging Face environment, then the local Hub plugin (tests/hub_plugin.py).

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` etc. once, when it is first imported: the environment is
isolated here, before pytest imports any test module or anything that imports huggingface_hub (hf_optim
does). Tests that talk to the Hub request the ``hub_server``, ``hub_repo_id`` or ``hub_api`` fixtures.
"""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("tests.hub_plugin")

from tests.hub_plugin import isolate_hf_environment  # noqa: E402

isolate_hf_environment()
# DeepSpeed picks its accelerator when imported: CPU for every test and every process a test starts
os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.hub_plugin"]


@pytest.fixture(autouse=True)
def _restore_registry():
    """Entries a test registers (unique names, overwrites) are gone after it, so every test sees the builtins.

    Listeners and providers are left alone (the transformers integration adds its own the first time
    transformers is imported, whichever test that happens in).
    """
    from hf_optim import registry

    with registry.snapshot():
        yield


@pytest.fixture
def make_accelerator():
    """Fresh Accelerator(cpu=True, **kwargs); Accelerate keeps process-wide singletons, reset around each test."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def sharded_saves(tmp_path_factory):
    """The sharded checkpoints of one two-process FSDP2 run, saved once per run (shared by the xdist workers):
    ``ckpt`` (optimizer and scheduler), ``acc`` (with a GradientAccumulator mid-window), and the state at each
    save (``at_save.safetensors``, ``acc_at_save.safetensors``). Tests copy what they change."""
    from tests.run_cache import once_per_run
    from tests.state.sharded_jobs import spawn_job

    def build(out):
        spawn_job(2, "acc-save", str(out))
        spawn_job(2, "save", str(out))

    return str(once_per_run(tmp_path_factory, "sharded_saves", build))
