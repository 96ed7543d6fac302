"""Single-process tests of hf_optim.integrations.accelerate.normalizer (ItemNormalizer).

The reference for every gradient is autograd on the whole accumulation window at once
(``sum of item losses / number of items``), computed without Accelerate. Two-process behaviour is tested in
``test_accelerate_multiprocess.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hf_optim.integrations.accelerate import ItemNormalizer


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def _loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum()  # summed over items (and the 2 outputs of each item)


def _window_reference(
    batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0
) -> dict[str, torch.Tensor]:
    model = _model(seed)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    (_loss_sum(model, x, y) / x.shape[0]).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_item_normalised_gradient_equals_full_batch(make_accelerator) -> None:
    k = 3
    accelerator = make_accelerator(gradient_accumulation_steps=k)
    model = accelerator.prepare(_model())
    normalizer = ItemNormalizer(accelerator, model)
    batches = [_batch(n, seed) for seed, n in enumerate([1, 7, 3])]  # unequal numbers of items
    for i, (x, y) in enumerate(batches):
        with accelerator.accumulate(model):
            normalizer.backward(_loss_sum(model, x, y), x.shape[0])
            assert accelerator.sync_gradients == (i == k - 1)
    expected = _window_reference(batches)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7)
    assert normalizer.num_items == 11
    ref = _model()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert normalizer.loss == pytest.approx(_loss_sum(ref, x, y).item() / 11, rel=1e-6)

    # The per-micro-batch mean that accelerator.backward(loss.mean()) would give differs: the test can tell.
    naive = _model()
    sum(((naive(bx) - by) ** 2).sum() / bx.shape[0] for bx, by in batches).backward()
    assert max((p.grad / k - expected[n]).abs().max().item() for n, p in naive.named_parameters()) > 1e-2


def test_partial_last_window_of_the_dataloader(make_accelerator) -> None:
    """5 micro-batches with K=2: Accelerate syncs after 2, 4 and at the end of the data (a window of 1)."""
    sizes = [2, 5, 1, 4, 3]
    batches = [_batch(n, 10 + i) for i, n in enumerate(sizes)]
    # One sample per dataset row; a batch_sampler reproduces the unequal micro-batches exactly.
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    index_batches = [list(range(bounds[i], bounds[i + 1])) for i in range(len(sizes))]
    loader = DataLoader(TensorDataset(x, y), batch_sampler=index_batches)

    accelerator = make_accelerator(gradient_accumulation_steps=2)
    model, loader = accelerator.prepare(_model(), loader)
    normalizer = ItemNormalizer(accelerator, model)
    synced = []
    for bx, by in loader:
        with accelerator.accumulate(model):
            normalizer.backward(_loss_sum(model, bx, by), torch.tensor(bx.shape[0]))
            if accelerator.sync_gradients:
                synced.append({n: p.grad.clone() for n, p in model.named_parameters()})
                model.zero_grad()
    windows = [batches[0:2], batches[2:4], batches[4:5]]
    assert len(synced) == len(windows)
    for got, window in zip(synced, windows, strict=True):
        expected = _window_reference(window)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    assert normalizer.num_items == sizes[-1]


def test_zero_items_leave_zero_gradients(make_accelerator) -> None:
    accelerator = make_accelerator()
    model = accelerator.prepare(_model())
    normalizer = ItemNormalizer(accelerator, model)
    x, y = _batch(0, 1)
    normalizer.backward(_loss_sum(model, x, y), 0)
    assert normalizer.num_items == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_item_normalizer_rejects_bad_input(make_accelerator) -> None:
    accelerator = make_accelerator()
    model = accelerator.prepare(_model())
    normalizer = ItemNormalizer(accelerator, model)
    x, y = _batch(3, 0)
    with pytest.raises(ValueError, match="loss_sum"):
        normalizer.backward(((model(x) - y) ** 2).sum(dim=1), 3)  # per-item losses, not their sum
    with pytest.raises(TypeError, match="num_items"):
        normalizer.backward(_loss_sum(model, x, y), 2.5)
    with pytest.raises(ValueError, match="num_items"):
        normalizer.backward(_loss_sum(model, x, y), -1)
    with pytest.raises(ValueError, match="num_items"):
        normalizer.backward(_loss_sum(model, x, y), torch.tensor(3.0))
    assert all(p.grad is None for p in model.parameters())  # nothing was back-propagated
    frozen = _model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="model_or_params"):
        ItemNormalizer(accelerator, frozen)


def test_item_normalizer_scales_each_parameter_once(make_accelerator) -> None:
    accelerator = make_accelerator()
    model = accelerator.prepare(_model())
    # Every parameter twice: in a param-group dict and as a (name, parameter) pair.
    normalizer = ItemNormalizer(
        accelerator, [{"params": list(model.parameters())}, *model.named_parameters()]
    )
    x, y = _batch(4, 3)
    normalizer.backward(_loss_sum(model, x, y), 4)
    expected = _window_reference([(x, y)])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="model_or_params"):
        ItemNormalizer(accelerator, ["not a parameter"])
