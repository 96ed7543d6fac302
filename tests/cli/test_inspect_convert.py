"""``hf-optim inspect`` and ``hf-optim convert``.

References: the live optimizer / scheduler / model the checkpoint was made from (parameter counts, state
sizes, learning rates), ``torch.load(weights_only=True)`` of the original pickled files, and a real
transformers ``Trainer`` checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def trained(named: bool = True, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    named_params = list(model.named_parameters())
    decay = [
        (n, p) if named else p for n, p in named_params if n.endswith("weight") and not n.startswith("1.")
    ]
    rest = [
        (n, p) if named else p
        for n, p in named_params
        if not (n.endswith("weight") and not n.startswith("1."))
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3
    )
    sched = hf_optim.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=50)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------


def test_inspect_json_matches_the_live_objects(tmp_path, capsys):
    model, opt, sched = trained()
    acc = hf_optim.GradientAccumulator()
    acc([p.detach().clone() for p in model.parameters()])
    hf_optim.save_state(tmp_path, opt, sched, acc)
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0
    info = json.loads(out)
    state = opt.state_dict()["state"]
    assert info["optimizer_class"] == "torch.optim.adamw.AdamW"
    assert info["num_params"] == len(list(model.parameters()))
    assert info["numel"] == sum(p.numel() for p in model.parameters())
    assert info["state_bytes"] == sum(
        t.numel() * t.element_size() for s in state.values() for t in s.values()
    )
    assert info["accumulator_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert info["step"] == [3.0, 3.0]
    assert info["scheduler_name"] == "cosine" and info["scheduler_step"] == 3
    assert info["scheduler_lr"] == sched.get_last_lr()
    groups = info["param_groups"]
    assert [g["num_params"] for g in groups] == [len(g["params"]) for g in opt.param_groups]
    assert [g["hyperparameters"]["lr"] for g in groups] == [g["lr"] for g in opt.param_groups]
    assert [g["hyperparameters"]["weight_decay"] for g in groups] == [0.1, 0.0]


def test_inspect_table(tmp_path, capsys):
    model, opt, sched = trained()
    hf_optim.save_state(tmp_path, opt, sched)
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.strip()}
    assert "torch.optim.adamw.AdamW" in rows["Optimizer"]
    assert f"{len(list(model.parameters()))} tensors" in rows["Parameters"]
    assert f"{sum(p.numel() for p in model.parameters()):,} elements" in rows["Parameters"]
    assert rows["Step"].split()[-1] == "3"
    lr = sched.get_last_lr()[0]
    assert (
        rows["Schedule"].startswith("Schedule")
        and "cosine" in rows["Schedule"]
        and f"{lr:.6g}" in rows["Schedule"]
    )
    lr_row = next(line for line in out.splitlines() if line.startswith("lr "))
    assert lr_row.split()[1:] == [f"{g['lr']:.6g}" for g in opt.param_groups]
    wd_row = next(line for line in out.splitlines() if line.startswith("weight_decay "))
    assert wd_row.split()[1:] == ["0.1", "0"]


def test_inspect_hub_repo(hub_repo_id, capsys):
    _, opt, sched = trained()
    hf_optim.push_state_to_hub(hub_repo_id, opt, sched, revision="exp", subfolder="ckpt")
    code, out, _ = run_cli(
        capsys, "inspect", hub_repo_id, "--revision", "exp", "--subfolder", "ckpt", "--json"
    )
    assert code == 0
    assert json.loads(out)["scheduler_lr"] == sched.get_last_lr()


def test_inspect_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and "no optimizer state in" in err
    (tmp_path / "optimizer.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and "optimizer.safetensors" in err and "corrupted" in err


def test_inspect_malformed_metadata_is_a_clear_error(tmp_path, capsys):
    """A parameter shape that is not a list of ints: an error naming the file, not a traceback."""
    _, opt, sched = trained()
    hf_optim.save_state(tmp_path, opt, sched)
    path = str(tmp_path / "optimizer.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    meta = json.loads(metadata["hf_optim"])
    meta["param_groups"][0]["params"][0]["shape"] = "16x4"
    metadata["hf_optim"] = json.dumps(meta)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    code, out, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 2 and not out
    assert "optimizer.safetensors: parameter '0.weight' has a malformed shape or dtype" in err


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


def write_torch_checkpoint(directory, opt, sched, suffix=".pt"):
    os.makedirs(directory, exist_ok=True)
    torch.save(opt.state_dict(), os.path.join(directory, f"optimizer{suffix}"))
    torch.save(sched.state_dict(), os.path.join(directory, f"scheduler{suffix}"))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_convert_unnamed_checkpoint_keys_by_index(tmp_path, capsys, suffix):
    _, opt, sched = trained(named=False)
    write_torch_checkpoint(tmp_path, opt, sched, suffix)
    reference = torch.load(tmp_path / f"optimizer{suffix}", weights_only=True)
    code, _, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 0, err
    assert {"optimizer.safetensors", "scheduler.json"} <= set(os.listdir(tmp_path))
    with safe_open(str(tmp_path / "optimizer.safetensors"), framework="pt") as f:
        assert "state.0.exp_avg" in set(f.keys())

    _, opt2, sched2 = trained(named=False, steps=0)
    hf_optim.load_state(tmp_path, opt2, sched2)
    assert same(opt2.state_dict(), reference)
    assert sched2.state_dict() == sched.state_dict()


def test_convert_with_names_file(tmp_path, capsys):
    _, opt, sched = trained(named=False)
    write_torch_checkpoint(tmp_path, opt, sched)
    reference = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    _, named_opt, _ = trained(named=True, steps=0)
    names = [n for g in named_opt.param_groups for n in g["param_names"]]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    code, _, err = run_cli(
        capsys,
        "convert",
        str(tmp_path),
        "--names-from",
        str(tmp_path / "names.txt"),
        "--output",
        str(tmp_path / "out"),
        "--optimizer-class",
        "torch.optim.adamw.AdamW",
    )
    assert code == 0, err
    with safe_open(str(tmp_path / "out" / "optimizer.safetensors"), framework="pt") as f:
        assert f"state.{names[0]}.exp_avg" in set(f.keys())

    _, opt2, sched2 = trained(named=True, steps=0)
    report = hf_optim.load_state(tmp_path / "out", opt2, sched2)
    assert report.complete
    got = opt2.state_dict()
    assert same(got["state"], reference["state"])
    for g_got, g_ref in zip(got["param_groups"], reference["param_groups"], strict=True):
        assert {k: v for k, v in g_got.items() if k != "param_names"} == g_ref

    (tmp_path / "names.txt").write_text("\n".join(names[:-1]))
    code, _, err = run_cli(capsys, "convert", str(tmp_path), "--names-from", str(tmp_path / "names.txt"))
    assert code == 2 and f"lists {len(names) - 1} names but" in err


def test_convert_refuses_arbitrary_pickles(tmp_path, capsys):
    torch.save({"state": {}, "param_groups": [], "evil": copy.copy}, tmp_path / "optimizer.pt")
    code, _, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 2 and "refusing to load" in err and "weights_only" in err
    assert os.listdir(tmp_path) == ["optimizer.pt"]


def test_convert_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 2 and "no optimizer.pt or optimizer.bin" in err
    torch.save({"a": 1}, tmp_path / "optimizer.pt")
    code, _, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 2 and "not an optimizer state_dict" in err


def test_convert_real_trainer_checkpoint(tmp_path, capsys):
    """A checkpoint written by transformers' Trainer converts with names from its config.json and loads."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)}
        for i in range(16)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "config.json").exists()
    reference = torch.load(ckpt / "optimizer.pt", weights_only=True)

    code, _, err = run_cli(capsys, "convert", str(ckpt), "--names-from", str(ckpt))
    assert code == 0, err

    # an optimizer built the way Trainer builds it, but with named parameters
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=3)
    report = hf_optim.load_state(ckpt, opt, sched)
    assert report.complete and report.scheduler_loaded
    got = opt.state_dict()
    assert same(got["state"], reference["state"])
    assert sched.state_dict()["last_epoch"] == 3
    with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
        assert "state.classifier.weight.exp_avg" in set(f.keys())
        assert "state.bert.embeddings.word_embeddings.weight.exp_avg_sq" in set(f.keys())


def test_convert_records_what_it_inferred_and_inspect_shows_it(tmp_path, capsys):
    _, opt, sched = trained(named=False)
    write_torch_checkpoint(tmp_path, opt, sched)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    code, _, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 0, err
    info = hf_optim.inspect_state(tmp_path)
    # torch.optim.AdamW keeps decoupled_weight_decay=True in its groups: that is how the class is told apart
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert info.optimizer_class == "torch.optim.adamw.AdamW"
    assert info.info["optimizer_class"].startswith("inferred")
    assert info.info["trainer_global_step"] == "3"
    assert info.info["parameter_names"].startswith("unknown")
    assert info.info["scheduler"].startswith("from scheduler.pt")
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0
    assert re.search(r"Converted: optimizer_class +inferred", out)
    assert re.search(r"Converted: trainer_global_step +3\n", out)


@pytest.mark.parametrize(
    "content",
    [b"not a zip file at all", b"PK\x03\x04" + b"\x00" * 40],
    ids=["garbage", "truncated-zip"],
)
def test_convert_of_a_malformed_file_prints_one_error_line(tmp_path, content):
    """In a subprocess, through the console entry point: one line on stderr naming the file, no traceback."""
    import subprocess
    import sys

    (tmp_path / "optimizer.pt").write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "convert", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and str(tmp_path / "optimizer.pt") in lines[0]
