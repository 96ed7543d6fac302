"""Single-process tests of hf_optim's Accelerate helpers: ItemNormalizer, accelerate_prepare.

The reference for every gradient is autograd on the whole accumulation window at once
(``sum of item losses / number of items``), computed without Accelerate. Two-process behaviour is tested in
``test_accelerate_multiprocess.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.utils.data import DataLoader, TensorDataset

import hf_optim
from hf_optim.integrations.accelerate import ItemNormalizer, accelerate_prepare, step_once_per_optimizer_step


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
    with pytest.raises(ValueError, match="num_items"):
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


def test_optimizer_and_scheduler_by_name_go_through_plain_prepare(make_accelerator) -> None:
    accelerator = make_accelerator()
    model = _model()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-2, weight_decay=0.1)
    scheduler = hf_optim.create_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    p_model, p_opt, p_sched = accelerator.prepare(model, optimizer, scheduler)
    assert isinstance(p_opt, AcceleratedOptimizer) and p_opt.optimizer is optimizer
    assert isinstance(
        p_opt.optimizer, torch.optim.AdamW
    )  # what DeepSpeed's CPU offload checks for AdamW mode
    assert isinstance(p_sched, AcceleratedScheduler) and p_sched.scheduler is scheduler
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(4, 0)
    accelerator.backward(_loss_sum(p_model, x, y))
    p_opt.step()
    p_sched.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert p_sched.get_last_lr() == [pytest.approx(1e-2 * 3 / 4)] * 2  # decay + no-decay groups, linear to 0


def test_accelerate_prepare_fixes_only_hf_optim_schedulers(make_accelerator) -> None:
    accelerator = make_accelerator()
    model = _model()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=1e-2)
    ours = hf_optim.create_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    other_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.lr_scheduler.StepLR(other_opt, step_size=2)
    prepared = accelerate_prepare(accelerator, model, optimizer, ours, other_opt, theirs)
    assert len(prepared) == 5
    p_ours, p_theirs = prepared[2], prepared[4]
    assert isinstance(p_ours, AcceleratedScheduler) and p_ours.scheduler is ours
    assert p_ours.split_batches is True  # steps once per optimizer step
    assert p_theirs.split_batches is False  # Accelerate's behaviour kept for other schedulers
    single = accelerate_prepare(accelerator, hf_optim.create_scheduler("constant", optimizer))
    assert isinstance(single, AcceleratedScheduler) and single.split_batches is True
    with pytest.raises(TypeError, match="AcceleratedScheduler"):
        step_once_per_optimizer_step(ours)


def test_import_hf_optim_does_not_import_accelerate() -> None:
    code = (
        "import sys, hf_optim\n"
        "assert 'accelerate' not in sys.modules, 'accelerate imported by import hf_optim'\n"
        "assert hf_optim.ItemNormalizer.__module__ == 'hf_optim.integrations.accelerate'\n"
        "assert callable(hf_optim.accelerate_save_state) and callable(hf_optim.accelerate_load_state)\n"
        "assert callable(hf_optim.accelerate_prepare)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
