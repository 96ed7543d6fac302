"""DeepSpeed tests run on CPU (``DS_ACCELERATOR=cpu``, gloo); they are skipped when deepspeed is not installed."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")
