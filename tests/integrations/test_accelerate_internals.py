"""hf_optim.integrations.accelerate.internals: Accelerate's private lists, checked before every use."""

from __future__ import annotations

import pytest
import torch

from hf_optim.errors import AccelerateIntegrationError
from hf_optim.integrations.accelerate import internals


class _Registered:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_lists_are_what_prepare_and_register_collected(make_accelerator):
    accelerator = make_accelerator()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    prepared = accelerator.prepare(model, optimizer, scheduler, loader)
    registered = _Registered()
    accelerator.register_for_checkpointing(registered)
    assert internals.models(accelerator) == [prepared[0]]
    assert internals.optimizers(accelerator) == [prepared[1]]
    assert internals.schedulers(accelerator) == [prepared[2]]
    assert internals.dataloaders(accelerator) == [prepared[3]]
    assert internals.registered_objects(accelerator) == [registered]
    with internals.hidden_from_accelerate(accelerator, custom_objects=True, scaler=True, dataloaders=True):
        assert accelerator._optimizers == accelerator._schedulers == accelerator._custom_objects == []
        assert accelerator._dataloaders == [] and accelerator.scaler is None
    with pytest.raises(KeyError), internals.hidden_from_accelerate(accelerator):
        raise KeyError("a failed save")
    assert internals.optimizers(accelerator) == [prepared[1]]  # put back, also after an error
    assert internals.registered_objects(accelerator) == [registered]


def test_changed_internals_are_one_clear_error(make_accelerator, monkeypatch):
    accelerator = make_accelerator()
    accelerator._custom_objects = ()  # as a future Accelerate might keep it
    with pytest.raises(AccelerateIntegrationError, match=r"Accelerate 1\.\d+.*Accelerator\._custom_objects"):
        internals.registered_objects(accelerator)
    import accelerate

    monkeypatch.setattr(accelerate, "__version__", "1.2.0")
    with pytest.raises(
        AccelerateIntegrationError, match=r"Accelerate 1\.2\.0: Accelerate >= 1\.15 is needed"
    ):
        internals.check_accelerator(make_accelerator())
