"""Single-process tests of hf_optim.integrations.accelerate.prepare (accelerate_prepare,
step_once_per_optimizer_step) and of the lazy export from ``hf_optim``.

Learning rates are checked against the linear schedule's formula written out.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

import hf_optim
from hf_optim.integrations.accelerate import accelerate_prepare, step_once_per_optimizer_step


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def _loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum()


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
        "assert hf_optim.ItemNormalizer.__module__ == 'hf_optim.integrations.accelerate.normalizer'\n"
        "assert callable(hf_optim.accelerate_save_state) and callable(hf_optim.accelerate_load_state)\n"
        "assert callable(hf_optim.accelerate_prepare) and callable(hf_optim.use_safetensors_state)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
