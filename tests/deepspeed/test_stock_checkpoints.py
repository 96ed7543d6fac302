"""Stock DeepSpeed checkpoints (``engine.save_checkpoint``: ``global_stepN/``, pickled, tied to the world size
that wrote them) converted into hf_optim's format, then resumed on another number of processes.

References: what hf_optim saves from the live engine at the same step (a second path to the same state, read
here straight from the files as docs/FORMAT.md describes them), DeepSpeed's own ``zero_to_fp32`` for the
weights, and one plain process trained on the same global batches for the resumed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_optim.state.convert import convert_checkpoint
from tests.deepspeed.runs import STOP, Saved, max_diff, reference

KINDS = ["zero1", "zero2", "zero3-bf16"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """Each kind's run on 2 processes (shared with the other DeepSpeed tests), its DeepSpeed checkpoint
    converted into a folder of this module's."""

    def convert(kind: str) -> tuple[Saved, Path]:
        if kind == "zero3-bf16":  # two param groups (decay / no decay) in three sub-groups
            extra = {"groups": 2, "zero_config": {"sub_group_size": 16}}
            saved = Saved.shared(tmp_path_factory, kind, 2, extra=extra, label="-groups")
        else:
            saved = Saved.shared(tmp_path_factory, kind, 2, again=kind == "zero2")
        out = tmp_path_factory.mktemp(f"converted-{kind}")
        written = convert_checkpoint(str(saved.deepspeed), output=str(out))
        assert sorted(Path(w).name for w in written) == ["model.safetensors", "optimizer.sharded.json"]
        return saved, out

    cache: dict[str, tuple[Saved, Path]] = {}

    def get(kind: str) -> tuple[Saved, Path]:
        if kind not in cache:
            cache[kind] = convert(kind)
        return cache[kind]

    return get


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and every tensor of a range-partitioned checkpoint, whole: its chunks, in order."""
    manifest = json.loads((directory / "optimizer.sharded.json").read_text())
    folder = directory / manifest["shards"]["folder"]
    entries = [e for record in manifest["state"].values() for e in record.values() if "chunks" in e]
    entries += list((manifest["master_weights"] or {}).values())
    tensors = {}
    for entry in entries:
        parts = []
        for chunk in entry["chunks"]:
            with safe_open(folder / chunk["file"], "pt") as f:
                parts.append(f.get_tensor(entry["sharded"]))
        tensors[entry["sharded"]] = torch.cat(parts).view(entry["shape"])
        assert tensors[entry["sharded"]].numel() == math.prod(entry["shape"])
    return manifest, tensors


@pytest.mark.parametrize("kind", KINDS)
def test_converted_state_is_what_hf_optim_saves_from_the_live_engine(converted, kind: str) -> None:
    saved, out = converted(kind)
    ours, tensors = _read(out)
    live, expected = _read(saved.directory)
    assert tensors.keys() == expected.keys() and tensors
    for key in expected:
        assert torch.equal(tensors[key], expected[key]), key
    for name, record in live["state"].items():  # step, and which entries each parameter has
        assert {k: v.get("value") for k, v in ours["state"][name].items()} == {
            k: v.get("value") for k, v in record.items()
        }
    assert ours["param_groups"] == live["param_groups"]
    assert ours["optimizer"] == live["optimizer"] and ours["zero"] == live["zero"]
    assert ours["loss_scaler"] == live["loss_scaler"] and ours["engine"] == live["engine"]
    assert (
        ours["scheduler"]["state_dict"] == live["scheduler"]["state_dict"]
    )  # from the Trainer's scheduler.pt
    assert (ours["master_weights"] is None) == (kind != "zero3-bf16")
    assert ours["info"]["global_steps"] == "3" and ours["info"]["source"].startswith(
        f"DeepSpeed ZeRO-{kind[4]}"
    )
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]


@pytest.mark.parametrize("kind", KINDS)
def test_converted_weights_are_deepspeeds_zero_to_fp32(converted, kind: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved, out = converted(kind)
    expected = get_fp32_state_dict_from_zero_checkpoint(str(saved.deepspeed))
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor.float()), name


@pytest.mark.parametrize(("kind", "world"), [("zero2", 3), ("zero3", 1), ("plain", 1)])
def test_stock_zero2_checkpoint_of_two_processes_resumes_on_another_world_size(
    converted, kind, world
) -> None:
    saved, out = converted("zero2")
    resumed = saved.resume(
        kind, world, f"stock-{kind}-{world}", load=str(out), weights_in=str(out / "model.safetensors")
    )
    assert max_diff(resumed[0]["weights"], reference()) < 1e-6


def test_stock_bf16_zero3_checkpoint_resumes_exactly_where_the_run_ends(converted) -> None:
    """Same layout, bf16: the fp32 master weights come back from the converted checkpoint, so the resumed run ends
    bit for bit where the uninterrupted one did."""
    saved, out = converted("zero3-bf16")
    resumed = saved.resume(
        "zero3-bf16", 2, "stock-same", load=str(out), weights_in=str(out / "model.safetensors")
    )
    assert resumed[0]["weights"] == saved.results[0]["weights"]
    assert resumed[0]["global_steps"] == saved.results[0]["global_steps"] == STOP  # DeepSpeed's counters too


def test_inspect_describes_zero_checkpoints_saved_or_converted(converted, tmp_path) -> None:
    import shutil

    import hf_optim
    from hf_optim.errors import CheckpointError

    saved, out = converted("zero2")
    shapes = {"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7), "2.bias": (3,)}
    for directory in (saved.directory, out):
        info = hf_optim.inspect_state(str(directory))
        assert isinstance(info, hf_optim.ShardedStateInfo) and info.world_size == info.num_shards == 2
        assert info.parameters == {n: {"exp_avg": s, "exp_avg_sq": s} for n, s in shapes.items()}
        assert info.step == (3.0, 3.0) and info.has_scheduler
        assert [g["num_params"] for g in info.param_groups] == [4]
    assert (
        info.info is not None
        and info.info["source"] == "DeepSpeed ZeRO-2 checkpoint global_step3 of 2 processes"
    )
    assert hf_optim.inspect_state(str(saved.directory)).info is None
    hostile = tmp_path / "hostile"
    shutil.copytree(out, hostile)
    doc = json.loads((hostile / "optimizer.sharded.json").read_text())
    doc["info"] = {"source": ["not", "text"]}
    (hostile / "optimizer.sharded.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"optimizer\.sharded\.json: 'info'"):
        hf_optim.inspect_state(str(hostile))


def test_stock_checkpoint_without_zero_converts_to_the_single_process_format(tmp_path_factory) -> None:
    """DeepSpeed without ZeRO keeps the client optimizer's state dict in ``mp_rank_00_model_states.pt``, keyed by
    index: converted and named by the module's parameters (the Trainer's ``scheduler.pt`` beside it too), it loads
    like what hf_optim saves from the engine."""
    import hf_optim
    from tests.deepspeed import zero_worker

    saved = Saved.shared(tmp_path_factory, "zero0", 1)
    out = tmp_path_factory.mktemp("converted-zero0")
    written = convert_checkpoint(str(saved.deepspeed), output=str(out))
    assert sorted(Path(w).name for w in written) == ["optimizer.safetensors", "scheduler.json"]
    info = hf_optim.inspect_state(str(out))
    assert info.keyed_by == "name" and "DeepSpeed module" in info.info["parameter_names"]
    states = []
    for directory in (out, saved.directory):
        model = zero_worker.make_model({})
        opt = zero_worker.make_optimizer(model.parameters(), "hf")
        sched = zero_worker.make_scheduler(opt)
        assert hf_optim.load_state(str(directory), opt, sched, model=model).complete
        states.append({n: opt.state[p] for n, p in model.named_parameters()})
    converted, native = states
    for name, state in native.items():
        assert state.keys() == converted[name].keys() and state
        for key, value in state.items():
            assert torch.equal(converted[name][key], value), (name, key)
