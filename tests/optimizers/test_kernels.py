"""Guards around torch's private APIs: without one, the optimizers run the next slower path and log it once.

Each private attribute is removed with ``monkeypatch`` (it is torch's, restored after the test); the result must
equal the reference path's (the path every fallback ends on is itself checked against the legacy oracles).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.utils._foreach_utils as foreach_utils
from torch.optim.optimizer import Optimizer

from hf_optim import AdamW, AdamWeightDecay
from hf_optim.optimizers import _kernels

FACTORIES = {
    "AdamW": lambda p, **kw: AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
    "AdamWeightDecay": lambda p, **kw: AdamWeightDecay(
        p, learning_rate=1e-2, weight_decay_rate=0.1, global_clipnorm=1.0, **kw
    ),
}
REMOVALS = {
    "fused kernel": [(torch, "_fused_adamw_")],
    "fused device list": [(foreach_utils, "_get_fused_kernels_supported_devices")],
    "grouping": [(Optimizer, "_group_tensors_by_device_and_dtype")],
    "a foreach op": [(torch, "_foreach_lerp_")],
    "foreach norm": [(torch, "_foreach_norm")],
    "all of them": [
        (torch, "_fused_adamw_"),
        (foreach_utils, "_get_fused_kernels_supported_devices"),
        (Optimizer, "_group_tensors_by_device_and_dtype"),
        (torch, "_foreach_lerp_"),
        (torch, "_foreach_norm"),
    ],
}


def run(factory, steps=4, **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(4, 3), (3,), (2, 2)]]
    opt = factory([(f"p{i}", p) for i, p in enumerate(params)], **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


@pytest.fixture(autouse=True)
def fresh_fallback_log(monkeypatch):
    monkeypatch.setattr(_kernels, "_logged_fallbacks", set())


@pytest.mark.parametrize("removal", list(REMOVALS))
@pytest.mark.parametrize("optimizer", list(FACTORIES))
@pytest.mark.parametrize(
    "flags", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"]
)
def test_missing_private_api_falls_back_to_a_slower_path(monkeypatch, caplog, optimizer, removal, flags):
    factory = FACTORIES[optimizer]
    expected = run(factory, foreach=False, fused=False)
    for owner, name in REMOVALS[removal]:
        monkeypatch.delattr(owner, name)
    with caplog.at_level(logging.INFO, logger="hf_optim.optimizers._kernels"):
        got = run(factory, **flags)
        run(factory, **flags)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages))  # each fallback logged once
    removed = {name for _, name in REMOVALS[removal]}
    fused_kernel = "foreach" not in flags and "_fused_adamw_" not in removed
    reached = {  # the private APIs this run asks for
        "_fused_adamw_": "foreach" not in flags,
        "_get_fused_kernels_supported_devices": fused_kernel,
        "_group_tensors_by_device_and_dtype": True,
        # the multi-tensor path, or AdamW's step increment next to the fused kernel
        "_foreach_lerp_": not fused_kernel or optimizer == "AdamW",
        "_foreach_norm": optimizer == "AdamWeightDecay",
    }
    logged = {name for name in removed for m in messages if f".{name}:" in m}
    assert logged == {name for name in removed if reached[name]}
    assert len(messages) == len(logged)


def test_a_missing_fused_kernel_is_logged_with_the_torch_version(monkeypatch, caplog):
    monkeypatch.delattr(torch, "_fused_adamw_")
    with caplog.at_level(logging.INFO, logger="hf_optim.optimizers._kernels"):
        run(FACTORIES["AdamW"], steps=1)
    assert caplog.records[0].levelno == logging.INFO
    assert caplog.records[0].getMessage() == (
        f"torch {torch.__version__} has no torch._fused_adamw_: the fused paths run the multi-tensor path instead"
    )


def test_hf_optim_imports_without_the_private_apis():
    code = (
        "import torch, torch.utils._foreach_utils as f\n"
        "from torch.optim.optimizer import Optimizer\n"
        "del torch._fused_adamw_, f._get_fused_kernels_supported_devices\n"
        "del Optimizer._group_tensors_by_device_and_dtype, torch._foreach_norm\n"
        "import hf_optim\n"
        "p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)\n"
        "hf_optim.AdamW([p], lr=0.1).step(); print(p.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    p = torch.ones(3, requires_grad=True)
    p.grad = torch.ones(3)
    AdamW([p], lr=0.1, foreach=False, fused=False).step()
    assert out.strip() == str(p.tolist())
