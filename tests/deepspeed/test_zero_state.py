"""DeepSpeed ZeRO optimizer state (format version 3): save on N processes under ZeRO 1/2/3, resume under any
stage, on any number of processes, under FSDP2 or in one plain process, and the other way round.

References: the uninterrupted run itself for the bit-exact same-layout resume; otherwise one plain process
trained on the same global batches, computed here with ``torch.optim``-style code independent of DeepSpeed
(DeepSpeed with ``gradient_clipping: 0`` and FSDP2 agree with it to fp32 rounding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.deepspeed import zero_worker
from tests.deepspeed.runs import SAVE_AT, STOP, Saved, engine_spec, max_diff, run
from tests.deepspeed.runs import reference as plain_reference
from tests.state.helpers import rewrite_safetensors


@pytest.fixture(scope="module")
def reference() -> dict[str, list[float]]:
    return plain_reference()


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved.shared(tmp_path_factory, "zero2", 2, again=True)


def test_each_process_writes_its_partition_as_safetensors(zero2: Saved) -> None:
    manifest = json.loads((zero2.directory / "optimizer.sharded.json").read_text())
    assert manifest["format_version"] == 3 and manifest["zero"]["stage"] == 2 and manifest["world_size"] == 2
    folder = zero2.directory / manifest["shards"]["folder"]
    files = sorted(p.name for p in folder.iterdir())
    assert files == manifest["shards"]["files"] and len(files) == 2
    assert sorted(p.name for p in zero2.directory.iterdir()) == sorted(
        [folder.name, "optimizer.sharded.json"]
    )
    # ranges tile each flattened tensor, and each range is that process's piece of it
    for name, record in manifest["state"].items():
        assert set(record) == {"step", "exp_avg", "exp_avg_sq"}
        entry = record["exp_avg"]
        numel = torch.Size(entry["shape"]).numel()
        position = 0
        for chunk in entry["chunks"]:
            assert chunk["range"][0] == position
            position = chunk["range"][1]
            with safe_open(folder / chunk["file"], "pt") as f:
                assert f.get_slice(entry["sharded"]).get_shape() == [chunk["range"][1] - chunk["range"][0]]
        assert position == numel, name
    assert manifest["master_weights"] is None  # fp32 training: the model's own weights


def test_resume_on_the_same_processes_is_bit_exact(zero2: Saved) -> None:
    resumed = zero2.resume("zero2", 2, "same")
    assert resumed[0]["weights"] == zero2.results[0]["weights"]
    assert resumed[0]["global_steps"] == zero2.results[0]["global_steps"] == STOP  # the engine's counters too


@pytest.mark.parametrize(
    ("kind", "world"),
    [("zero2", 3), ("zero3", 2), ("zero1", 2), ("plain", 1), ("fsdp", 2)],
    ids=["zero2-on-3", "zero3-on-2", "zero1-on-2", "plain", "fsdp2-on-2"],
)
def test_zero2_checkpoint_resumes_anywhere(zero2: Saved, reference, kind: str, world: int) -> None:
    resumed = zero2.resume(kind, world, f"{kind}-{world}")
    assert max_diff(resumed[0]["weights"], reference) < 1e-6
    assert max_diff(zero2.results[0]["weights"], reference) < 1e-6


def test_range_checkpoint_loads_with_strict_false_like_a_single_file_one(zero2: Saved) -> None:
    """A ZeRO checkpoint into an ordinary optimizer that has only some of its parameters, ``strict=False``: the
    same report as the same state saved by one process (the one check and apply of every layout)."""
    ranges, single = zero2.resume("plain", 1, "partial", partial=True, stop=SAVE_AT)[0]["partial"]
    assert ranges == single
    assert sorted(ranges["unexpected"]) == ["2.bias", "2.weight"]
    assert sorted(ranges["loaded"]) == ["0.bias", "0.weight"] and not ranges["missing"]


@pytest.mark.parametrize(("saved_by", "kind", "world"), [("fsdp", "zero2", 2), ("plain", "zero3", 2)])
def test_fsdp2_and_plain_checkpoints_resume_under_zero(tmp_path, reference, saved_by, kind, world) -> None:
    saved = Saved(tmp_path, saved_by, 2 if saved_by == "fsdp" else 1)
    resumed = saved.resume(kind, world, "resumed")
    assert max_diff(resumed[0]["weights"], reference) < 1e-6


def test_bf16_resume_restores_the_fp32_master_weights(tmp_path) -> None:
    saved = Saved(tmp_path, "zero2-bf16", 2)
    manifest = json.loads((saved.directory / "optimizer.sharded.json").read_text())
    assert manifest["zero"]["dtype"] == "bfloat16" and set(manifest["master_weights"]) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    resumed = saved.resume("zero2-bf16", 2, "resumed")
    assert resumed[0]["weights"] == saved.results[0]["weights"]


def _edited(source: Path, target: Path, change) -> str:
    shutil.copytree(source, target)
    doc = json.loads((target / "optimizer.sharded.json").read_text())
    change(doc, target / doc["shards"]["folder"])
    (target / "optimizer.sharded.json").write_text(json.dumps(doc))
    return str(target)


def _without_2_bias(doc: dict, folder: Path) -> None:
    """The checkpoint of an optimizer without ``2.bias``: out of its group, its state and the partition files."""
    doc["param_groups"][0]["params"].remove("2.bias")
    del doc["state"]["2.bias"]
    for path in folder.iterdir():
        rewrite_safetensors(path, change_tensors=lambda t: [t.pop(k) for k in list(t) if ".2.bias." in k])


def test_strict_means_under_zero_what_it_means_in_one_process(zero2: Saved, tmp_path) -> None:
    """One check for every layout: a hyperparameter the optimizer lacks is refused with ``strict=True`` and
    dropped with a note with ``strict=False``, with the same words under ZeRO-2 on 2 processes as in one plain
    process. What ZeRO adds: the parameters of one flat partition load together or not at all."""
    extra = _edited(
        zero2.directory,
        tmp_path / "extra",
        lambda doc, _: doc["param_groups"][0]["hyperparameters"]["dict"].update(extra_knob=0.5),
    )
    partial = _edited(zero2.directory, tmp_path / "partial", _without_2_bias)
    loads = [[extra, True], [extra, False], [partial, False]]
    outcomes = {}
    for kind, world in (("zero2", 2), ("plain", 1)):
        spec = {**engine_spec(kind), "stop": 0, "strict_loads": loads}
        outcomes[kind] = [r["strict_loads"] for r in run(tmp_path, kind, world, spec)]
    zero_ranks, (plain,) = outcomes["zero2"], outcomes["plain"]
    assert zero_ranks[0] == zero_ranks[1]
    refused, dropped, partial_load = zero_ranks[0]
    assert "hyperparameters the optimizer does not have: ['extra_knob']" in refused["error"]
    assert refused["error"] == plain[0]["error"]
    assert dropped["param_groups_restored"] and dropped["notes"] == plain[1]["notes"]
    assert any(
        "ignored hyperparameters the optimizer does not have: ['extra_knob']" in n for n in dropped["notes"]
    )
    assert (
        sorted(dropped["loaded"])
        == sorted(plain[1]["loaded"])
        == ["0.bias", "0.weight", "2.bias", "2.weight"]
    )
    # one plain process loads the three parameters it can; ZeRO-2 keeps one state for the group's four
    assert sorted(plain[2]["loaded"]) == ["0.bias", "0.weight", "2.weight"] and plain[2]["missing"] == [
        "2.bias"
    ]
    assert partial_load["loaded"] == [] and partial_load["missing"] == ["2.bias"]
    assert sorted(partial_load["mismatched"]) == ["0.bias", "0.weight", "2.weight"]
    assert any("ZeRO keeps one state for 4 parameters" in n for n in partial_load["notes"])


def test_the_fp16_loss_scaler_is_restored_from_a_saved_or_converted_checkpoint(tmp_path) -> None:
    """DeepSpeed's ``DynamicLossScaler`` (fp16's; fp16 ZeRO does not run on CPU, so it replaces fp32's here) after
    5 steps with a window of 4 (one doubling), saved by hf_optim and by DeepSpeed: loaded into a new scaler, each
    holds the values it had at the save."""
    from hf_optim.state.convert import convert_checkpoint

    spec = {**engine_spec("zero2"), "stop": 5, "save_at": 5, "dynamic_scaler": 256.0}
    spec.update(save=str(tmp_path / "saved"), ds_save=str(tmp_path / "deepspeed"))
    at_save = run(tmp_path, "saving", 2, spec)[0]["scaler_at_save"]
    assert at_save["cur_scale"] == 512.0 and at_save["cur_iter"] == 5  # it did change
    convert_checkpoint(str(tmp_path / "deepspeed"), output=str(tmp_path / "converted"))
    loads = [str(tmp_path / "saved"), str(tmp_path / "converted")]
    loaded = run(tmp_path, "loading", 2, {**engine_spec("zero2"), "stop": 0, "scaler_loads": loads})
    for rank in loaded:
        assert rank["scalers_loaded"] == [at_save, at_save]


@pytest.fixture(scope="module")
def other_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    """Saves of the same run with another world size (ZeRO-2 on 3) and another stage (ZeRO-3 on 2)."""
    return {
        "another world size": Saved.shared(tmp_path_factory, "zero2", 3),
        "another stage": Saved.shared(tmp_path_factory, "zero3", 2),
    }


def _hostile(zero2: Saved, others: dict[str, Saved], tmp: Path) -> dict[str, tuple[Path, str]]:
    """Hostile copies of the ZeRO-2 checkpoint, each with the file its error must name."""
    manifest_doc = json.loads((zero2.directory / "optimizer.sharded.json").read_text())
    folder = manifest_doc["shards"]["folder"]
    cases: dict[str, tuple[Path, str]] = {}

    def copy(name: str) -> Path:
        target = tmp / name
        shutil.copytree(zero2.directory, target)
        return target

    target = copy("other-save")
    other = json.loads((zero2.again / "optimizer.sharded.json").read_text())["shards"]["folder"]
    shutil.copy(zero2.again / other / "shard-00002-model-00001-of-00001.safetensors", target / folder)
    cases["partition file from another save"] = (target, "shard-00002-model-00001-of-00001.safetensors")
    for what, saved in others.items():
        target = copy(what.replace(" ", "-"))
        other = json.loads((saved.directory / "optimizer.sharded.json").read_text())["shards"]["folder"]
        shutil.copy(saved.directory / other / "shard-00002-model-00001-of-00001.safetensors", target / folder)
        cases[f"partition file from a save with {what}"] = (
            target,
            "shard-00002-model-00001-of-00001.safetensors",
        )

    def edit(name: str, change) -> None:
        target = copy(name)
        doc = json.loads((target / "optimizer.sharded.json").read_text())
        change(doc["state"]["0.weight"]["exp_avg"]["chunks"])
        (target / "optimizer.sharded.json").write_text(json.dumps(doc))
        cases[name] = (target, "optimizer.sharded.json")

    edit("ranges overlap", lambda chunks: chunks[1]["range"].__setitem__(0, chunks[1]["range"][0] - 1))
    edit("ranges leave a gap", lambda chunks: chunks[1]["range"].__setitem__(0, chunks[1]["range"][0] + 1))
    edit("range outside the tensor", lambda chunks: chunks[-1]["range"].__setitem__(1, 10**6))
    return cases


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_hostile_zero_checkpoints_change_nothing_on_any_rank(
    zero2: Saved, other_layouts: dict[str, Saved], tmp_path, engine
) -> None:
    cases = _hostile(zero2, other_layouts, tmp_path)
    spec = {**engine_spec(engine), "stop": 1, "attacks": [str(path) for path, _ in cases.values()]}
    results = run(tmp_path, "attacks", 2, spec)
    for rank, result in enumerate(results):
        for (case, (_, file_name)), outcome in zip(cases.items(), result["attacks"], strict=True):
            assert outcome["error"].startswith("CheckpointError"), (case, rank, outcome)
            assert file_name in outcome["error"], (case, rank, outcome)
            assert outcome["unchanged"], (case, rank)


def test_push_from_every_process_then_each_machine_downloads_only_its_partition(
    zero2: Saved, hub_repo_id, hub_api, tmp_path
) -> None:
    pushing = {**engine_spec("zero2"), "stop": SAVE_AT, "push": hub_repo_id, "save_at": SAVE_AT}
    run(tmp_path, "pushing", 2, pushing)
    files = hub_api.list_repo_files(hub_repo_id)
    assert "run/optimizer.sharded.json" in files
    assert len([f for f in files if f.startswith("run/optimizer-shards-")]) == 2
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin")) or "/." in f]
    resumed = zero2.resume("zero2", 2, "from-hub", load=f"hf://{hub_repo_id}/run", machines=str(tmp_path))
    assert resumed[0]["weights"] == zero2.results[0]["weights"]
    for machine in range(2):
        cached = sorted(
            p.name for p in (tmp_path / f"machine{machine}").rglob("*.safetensors") if "snapshots" in p.parts
        )
        # the same ZeRO-2 layout on load: process r reads only what process r wrote
        assert cached == [f"shard-{machine + 1:05d}-model-00001-of-00001.safetensors"]


LEGACY = ["adamw_no_bias_correction", "adam_weight_decay", "bert_adam"]


def _plain_run(optimizer: str, steps: int) -> dict[str, list[float]]:
    model = zero_worker.make_model({})
    opt = zero_worker.make_optimizer(model.parameters(), optimizer)
    for step in range(steps):
        x, y = zero_worker.batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().flatten().tolist() for k, v in model.named_parameters()}


#: ZeRO-Offload keeps the client optimizer (and its math) only with ``zero_force_ds_cpu_optimizer: false``
OFFLOAD = {
    "zero_config": {"offload_optimizer": {"device": "cpu"}},
    "ds_config": {"zero_force_ds_cpu_optimizer": False},
}


@pytest.mark.parametrize(("stage", "offload"), [(1, False), (2, False), (3, False), (3, True)])
def test_legacy_optimizers_under_zero_match_one_process(tmp_path, stage, offload) -> None:
    """hf_optim.AdamW (no bias correction), AdamWeightDecay and BertAdam as DeepSpeed client optimizers under
    ZeRO give the one-process result of the same global batches (``gradient_clipping: 0``); under ZeRO-Offload
    too, with the client optimizer kept."""
    spec = {"engine": "zero", "stage": stage, "stop": 0, "also": LEGACY, **(OFFLOAD if offload else {})}
    results = run(tmp_path, "legacy", 2, {**spec, "also_steps": STOP})
    for optimizer in LEGACY:
        expected = _plain_run(optimizer, STOP)
        got = results[0]["also"][optimizer]
        assert got["offloaded"] == offload, optimizer
        assert max_diff(got["weights"], expected) < 1e-6, optimizer
        assert max_diff(expected, _plain_run(optimizer, 0)) > 1e-3  # the runs did train


def test_importing_hf_optim_does_not_import_deepspeed() -> None:
    import subprocess
    import sys

    code = "import sys, hf_optim, hf_optim.state; print('deepspeed' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False"
