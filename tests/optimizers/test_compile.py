"""``torch.compile(optimizer.step)`` against eager, on every implementation path, with no graph break.

Under compile the step count stays a tensor (no ``.item()``) and the fused choice runs the multi-tensor code
(see ``hf_optim.optimizers._kernels.group_buckets``); the result must be eager's to float32 rounding. Compiling
is slow on CPU: one small test per optimizer and path, a few steps on tiny tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hf_optim import AdamW, AdamWeightDecay

IMPLS = {"reference": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "default": {}}
FACTORIES = {
    "AdamW": lambda p, **kw: AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
    "AdamW-no-bias-correction": lambda p, **kw: AdamW(p, lr=1e-2, weight_decay=0.1, correct_bias=False, **kw),
    "AdamWeightDecay": lambda p, **kw: AdamWeightDecay(
        p,
        learning_rate=1e-2,
        weight_decay_rate=0.1,
        exclude_from_weight_decay=["bias"],
        global_clipnorm=1.0,
        amsgrad=True,
        **kw,
    ),
}
STEPS = 4


def make_params():
    g = torch.Generator().manual_seed(0)
    return [
        ("w", torch.randn(4, 3, generator=g).requires_grad_()),
        ("bias", torch.randn(3, generator=g).requires_grad_()),
    ]


CASES = [(optimizer, impl) for optimizer in ("AdamW", "AdamWeightDecay") for impl in IMPLS]
CASES.append(("AdamW-no-bias-correction", "default"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("optimizer", "impl"), CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_compiled_step_matches_eager(optimizer, impl):
    torch._dynamo.reset()
    counters.clear()
    factory = FACTORIES[optimizer]
    eager_params, compiled_params = make_params(), make_params()
    eager = factory(eager_params, **IMPLS[impl])
    compiled = factory(compiled_params, **IMPLS[impl])
    step = torch.compile(compiled.step)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for (_, p), (_, q) in zip(eager_params, compiled_params, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        eager.step()
        step()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it was compiled
    for (name, p), (_, q) in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        for key, value in eager.state[p].items():
            torch.testing.assert_close(
                compiled.state[q][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}"
            )
    if optimizer == "AdamWeightDecay":
        assert compiled.iterations == STEPS  # Keras' count, kept on the step tensors under compile
