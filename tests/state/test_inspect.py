"""inspect_state: a checkpoint described from metadata and headers."""

from __future__ import annotations

import json

import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import (
    OPTIMIZER_NAME,
    save_state,
)
from tests.state.helpers import (
    OPTIMIZERS,
    batches,
    make_setup,
    train,
)


def test_inspect_skips_step_counters_that_are_not_real_numbers(tmp_path):
    model, opt, sched = make_setup(OPTIMIZERS["torch_adamw"])
    train(model, opt, sched, batches(1, 3))
    save_state(tmp_path, opt)
    path = tmp_path / OPTIMIZER_NAME
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    tensors["state.head.bias.step"] = torch.tensor(1 + 2j, dtype=torch.complex64)
    meta = json.loads(md["hf_optim"])
    meta["state"]["head.bias"]["step"]["dtype"] = "complex64"
    md["hf_optim"] = json.dumps(meta)
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert hf_optim.inspect_state(tmp_path).step == (min(steps), max(steps)) == (3.0, 3.0)
