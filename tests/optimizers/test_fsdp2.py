"""hf_optim's optimizers on FSDP2 (``fully_shard``) DTensor parameters: 2 processes vs 1 process, same global batch.

Two CPU processes (gloo) each take half of a global batch; FSDP2 shards every parameter along dim 0 and averages
the gradients, so each optimizer step must land where the same optimizer lands in one process on the whole batch
(to float32 rounding). Checked for AdamW and AdamWeightDecay on every implementation path, with name patterns
(the model's fully qualified names) and with the Keras norms (``clipnorm``, ``global_clipnorm``), which must be
those of the full parameters, not of the local shards. All runs happen in one spawn per module.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from hf_optim import AdamW, AdamWeightDecay
from tests.multiprocess import end_process_group, free_port, run_workers

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)

WORLD_SIZE = 2
STEPS = 3
IMPLS = {"reference": {"foreach": False, "fused": False}, "foreach": {"foreach": True}, "default": {}}
# small gradient norms so that the clipping thresholds below are active
CONFIGS = {
    "AdamW": (AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "AdamW-no-bias-correction": (AdamW, {"lr": 1e-2, "weight_decay": 0.1, "correct_bias": False}),
    "AdamWeightDecay-names": (
        AdamWeightDecay,
        {"learning_rate": 1e-2, "weight_decay_rate": 0.1, "exclude_from_weight_decay": ["bias", r"^2\."]},
    ),
    "AdamWeightDecay-clipnorm": (
        AdamWeightDecay,
        {"learning_rate": 1e-2, "clipnorm": 0.05, "clipvalue": 0.5},
    ),
    "AdamWeightDecay-global_clipnorm": (
        AdamWeightDecay,
        {"learning_rate": 1e-2, "global_clipnorm": 0.1, "amsgrad": True, "weight_decay_rate": 0.01},
    ),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # first dims 8, 6 and 3 (odd): shards of unequal size, one process holds 1 of the 3 rows
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]


def train(model: nn.Module, factory, kwargs: dict, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    opt = factory(model.named_parameters(), **kwargs)
    per_rank = 8 // world_size
    for x, y in batches():
        xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        loss = ((model(xs) - ys) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        _train_all(rank, out)  # its sharded models go with its frame, before the group is destroyed
    finally:
        end_process_group()


def _train_all(rank: int, out: str) -> None:
    for config, (factory, kwargs) in CONFIGS.items():
        for impl, flags in IMPLS.items():
            model = make_model()
            for layer in (model[0], model[2], model[4]):
                fsdp.fully_shard(layer)
            fsdp.fully_shard(model)
            assert type(model[0].weight).__name__ == "DTensor"
            weights = train(model, factory, {**kwargs, **flags}, rank, WORLD_SIZE)
            if rank == 0:
                save_file(weights, os.path.join(out, f"{config}-{impl}.safetensors"))


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2")
    run_workers(_worker, (free_port(), str(out)), WORLD_SIZE)
    return {
        (config, impl): load_file(out / f"{config}-{impl}.safetensors")
        for config in CONFIGS
        for impl in IMPLS
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_process_fsdp2_matches_one_process(sharded_results, config, impl):
    factory, kwargs = CONFIGS[config]
    expected = train(make_model(), factory, {**kwargs, **IMPLS[impl]}, rank=0, world_size=1)
    initial = dict(make_model().named_parameters())
    got = sharded_results[(config, impl)]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert not torch.equal(value, initial[name])  # the run moved every parameter
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{config}/{impl}: {name}")
