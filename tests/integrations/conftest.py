"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest


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
