"""DeepSpeed tests run on CPU (``DS_ACCELERATOR=cpu``, set in tests/conftest.py; gloo); they are skipped when
deepspeed is not installed."""

import pytest

pytest.importorskip("deepspeed")
