"""hf_optim.Trainer checkpoints: safetensors file set, exact resume (local, from the local Hub in a fresh process,
from a legacy ``optimizer.pt`` checkpoint), fallback for DeepSpeed/FSDP.

The reference for "exact" is an uninterrupted run of the same configuration: after resuming, the final weights
must be bit-for-bit equal to it. A stock ``transformers.Trainer`` resuming from a safetensors-only checkpoint
(its loader silently skips the optimizer) is the negative control: its weights differ.

Runs use ``scripts/train_trainer.py`` (tiny BERT built from a config, synthetic sentences; 64 examples, batch 8,
so 8 steps per epoch: the interruption at step 6 is mid-epoch and the resumed run crosses an epoch boundary).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("transformers")
import transformers

import hf_optim
from tests.hub_plugin import client_env
from tests.integrations.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_trainer.py"
N_STEPS = 12
STOP_AT = 6
STATE_FILES = {"optimizer.safetensors", "scheduler.json"}
PICKLED_OPTIMIZER_FILES = {"optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin"}


def _load_script():
    return load_script("train_trainer.py", "hf_optim_train_trainer_script")


train_script = _load_script()


def script_args(output_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--optim",
        "adamw_hf",
        "--lr_scheduler_type",
        "cosine",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
        "--weight_decay",
        "0.01",
        "--max_steps",
        str(N_STEPS),
        "--save_steps",
        str(STOP_AT),
        "--logging_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--num_train_examples",
        "64",
        "--num_eval_examples",
        "8",
        "--hidden_size",
        "32",
        "--intermediate_size",
        "37",
        "--seed",
        "7",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def logged_lrs(output_dir: Path) -> dict[int, float]:
    with open(output_dir / "trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}


def run_script_subprocess(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ok(process: subprocess.Popen, timeout: float = 600) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"training subprocess failed:\n{stderr[-6000:]}"
    return stdout + stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: N_STEPS steps in one go (this process)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = train_script.main(script_args(out))
    assert summary["global_step"] == N_STEPS and not summary["stopped_early"]
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """The same run stopped after STOP_AT steps (checkpoint-STOP_AT saved by hf_optim.Trainer)."""
    out = tmp_path_factory.mktemp("interrupted")
    summary = train_script.main(script_args(out, "--stop_after_step", str(STOP_AT)))
    assert summary["global_step"] == STOP_AT and summary["stopped_early"]
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_checkpoints_hold_safetensors_state_and_no_pickled_optimizer(uninterrupted):
    for step in (STOP_AT, N_STEPS):
        checkpoint = uninterrupted / f"checkpoint-{step}"
        files = set(os.listdir(checkpoint))
        assert files >= STATE_FILES
        assert not files & PICKLED_OPTIMIZER_FILES
        # the rest is transformers' own: weights, config, trainer state, RNG state, training arguments
        assert files - STATE_FILES == {
            "config.json",
            "model.safetensors",
            "trainer_state.json",
            "rng_state.pth",
            "training_args.bin",
        }
        with open(checkpoint / "scheduler.json", encoding="utf-8") as f:
            scheduler_doc = json.load(f)
        assert scheduler_doc["class"] == "torch.optim.lr_scheduler.LambdaLR"
        assert scheduler_doc["state_dict"]["dict"]["last_epoch"] == step
        # the schedule is described by name and arguments (those of script_args), so it rebuilds without code
        assert (scheduler_doc["name"], scheduler_doc["kwargs"]) == (
            "cosine",
            {"dict": {"num_warmup_steps": 2, "num_training_steps": N_STEPS, "num_cycles": 0.5}},  # FORMAT.md
        )
        info = hf_optim.inspect_state(str(checkpoint))
        assert info.scheduler_step == step
        assert (info.optimizer_name, info.keyed_by) == ("adamw_hf", "name")  # state keyed by parameter name
        with safe_open(checkpoint / "optimizer.safetensors", framework="pt") as f:
            keys = set(f.keys())
        assert "state.bert.embeddings.word_embeddings.weight.exp_avg" in keys


def test_exact_resume_from_local_checkpoint(uninterrupted, interrupted):
    checkpoint = interrupted / f"checkpoint-{STOP_AT}"
    assert set(os.listdir(checkpoint)) >= STATE_FILES
    summary = train_script.main(script_args(interrupted, "--resume_from_checkpoint", str(checkpoint)))
    assert summary["global_step"] == N_STEPS
    assert_bitwise_equal(weights(interrupted), weights(uninterrupted))
    assert logged_lrs(interrupted) == logged_lrs(uninterrupted)


@pytest.mark.parametrize(
    "options",
    [
        [
            "--optim",
            "adam_weight_decay",
            "--optim_args",
            "amsgrad=true,clipnorm=1.0",
            "--lr_scheduler_type",
            "cosine_with_restarts",
        ],
        ["--optim", "adamw_torch_fused", "--lr_scheduler_type", "linear"],
    ],
    ids=["adam_weight_decay", "adamw_torch_fused"],
)
def test_exact_resume_other_optimizers(tmp_path, options):
    """Keras AdamWeightDecay (amsgrad state, clipping, iteration count) and torch's own AdamW resume exactly too."""
    train_script.main(script_args(tmp_path / "reference", *options))
    train_script.main(script_args(tmp_path / "run", *options, "--stop_after_step", str(STOP_AT)))
    checkpoint = tmp_path / "run" / f"checkpoint-{STOP_AT}"
    assert set(os.listdir(checkpoint)) >= STATE_FILES
    train_script.main(script_args(tmp_path / "run", *options, "--resume_from_checkpoint", str(checkpoint)))
    assert_bitwise_equal(weights(tmp_path / "run"), weights(tmp_path / "reference"))


def test_plain_trainer_resumes_hf_optim_state_exactly(uninterrupted, interrupted, tmp_path):
    """transformers.Trainer alone skips a folder without optimizer.pt; with hf_optim installed it restores the
    optimizer and the schedule from optimizer.safetensors + scheduler.json: the same weights and learning rates
    as the uninterrupted run (the cosine schedule ends where it would have, not restarted)."""
    checkpoint = interrupted / f"checkpoint-{STOP_AT}"
    out = tmp_path / "plain"
    train_script.main(
        script_args(out, "--trainer_class", "transformers", "--resume_from_checkpoint", str(checkpoint))
    )
    assert_bitwise_equal(weights(out), weights(uninterrupted))
    resumed, reference = logged_lrs(out), logged_lrs(uninterrupted)
    assert resumed and all(resumed[step] == reference[step] for step in resumed)


def test_plain_trainer_refuses_hf_optim_state_under_deepspeed(interrupted):
    """Where plain Trainer cannot restore hf_optim's state (DeepSpeed, FSDP), the resume fails loudly."""
    import transformers

    from hf_optim import CheckpointError

    trainer = transformers.Trainer.__new__(transformers.Trainer)
    trainer.is_deepspeed_enabled, trainer.is_fsdp_enabled = True, False
    with pytest.raises(CheckpointError, match=r"hf_optim\.Trainer"):
        trainer._load_optimizer_and_scheduler(str(interrupted / f"checkpoint-{STOP_AT}"))


def test_exact_resume_from_legacy_optimizer_pt_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "legacy"
    train_script.main(script_args(out, "--trainer_class", "transformers", "--stop_after_step", str(STOP_AT)))
    checkpoint = out / f"checkpoint-{STOP_AT}"
    files = set(os.listdir(checkpoint))
    assert {"optimizer.pt", "scheduler.pt"} <= files and not files & STATE_FILES
    train_script.main(script_args(out, "--resume_from_checkpoint", str(checkpoint)))
    assert_bitwise_equal(weights(out), weights(uninterrupted))
    # from then on hf_optim.Trainer writes safetensors
    later = set(os.listdir(out / f"checkpoint-{N_STEPS}"))
    assert later >= STATE_FILES and not later & PICKLED_OPTIMIZER_FILES


def test_exact_resume_from_the_hub_in_a_fresh_process(
    uninterrupted, hub_server, hub_repo_id, hub_api, tmp_path
):
    """Uninterrupted run vs (run to STOP_AT, push last-checkpoint/, fresh process resumes from hf://)."""
    summary = train_script.main(
        script_args(
            tmp_path / "first",
            "--stop_after_step",
            str(STOP_AT),
            "--push_to_hub",
            "--hub_model_id",
            hub_repo_id,
            "--hub_strategy",
            "checkpoint",
            "--hub_token",
            hub_server.token,
        )
    )
    assert summary["global_step"] == STOP_AT

    files = set(hub_api.list_repo_files(hub_repo_id))
    assert {"last-checkpoint/optimizer.safetensors", "last-checkpoint/scheduler.json"} <= files
    assert not {f"last-checkpoint/{name}" for name in PICKLED_OPTIMIZER_FILES} & files
    with open(
        hub_api.hf_hub_download(hub_repo_id, "last-checkpoint/trainer_state.json"), encoding="utf-8"
    ) as f:
        assert json.load(f)["global_step"] == STOP_AT

    # A new process with an empty cache, resuming from the Hub URL (revision and subfolder in it).
    fresh_env = client_env(hub_server.endpoint, tmp_path / "hf_home_fresh", token=hub_server.token)
    url = f"hf://{hub_repo_id}@main/last-checkpoint"
    log = wait_ok(
        run_script_subprocess(script_args(tmp_path / "resumed", "--resume_from_checkpoint", url), fresh_env)
    )
    assert f"Resuming from {url}" in log
    assert_bitwise_equal(weights(tmp_path / "resumed"), weights(uninterrupted))
    assert logged_lrs(tmp_path / "resumed") == logged_lrs(uninterrupted)


def test_resume_from_a_corrupt_optimizer_state_raises_naming_the_file(interrupted, tmp_path):
    """A damaged optimizer.safetensors must stop the resume (not silently restart the optimizer)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(interrupted / f"checkpoint-{STOP_AT}", checkpoint)
    state_file = checkpoint / "optimizer.safetensors"
    with open(state_file, "r+b") as f:
        f.seek(8)  # the start of the JSON header, after its 8-byte length
        f.write(b"#####")
    with pytest.raises(hf_optim.CheckpointError, match=re.escape(str(state_file))):
        train_script.main(script_args(tmp_path / "out", "--resume_from_checkpoint", str(checkpoint)))


def test_exact_resume_from_a_hub_web_url(uninterrupted, interrupted, hub_repo_id, hub_api, tmp_path):
    """The huggingface.co address of a checkpoint folder resumes like its hf:// URL (from the local Hub)."""
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_folder(
        repo_id=hub_repo_id,
        folder_path=str(interrupted / f"checkpoint-{STOP_AT}"),
        path_in_repo="last-checkpoint",
    )
    url = f"https://huggingface.co/{hub_repo_id}/tree/main/last-checkpoint"
    summary = train_script.main(script_args(tmp_path / "resumed", "--resume_from_checkpoint", url))
    assert summary["global_step"] == N_STEPS
    assert_bitwise_equal(weights(tmp_path / "resumed"), weights(uninterrupted))


def test_deepspeed_and_fsdp_keep_transformers_checkpointing(tmp_path, monkeypatch, caplog):
    """Under FSDP (or DeepSpeed) the base methods run, with a warning; nothing is written by hf_optim."""
    calls = []
    monkeypatch.setattr(
        transformers.Trainer, "_save_optimizer_and_scheduler", lambda self, d: calls.append(("save", d))
    )
    monkeypatch.setattr(
        transformers.Trainer, "_load_optimizer_and_scheduler", lambda self, d: calls.append(("load", d))
    )
    model = train_script.BertForSequenceClassification(
        train_script.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16
        )
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], optim="adamw_hf"
    )
    trainer = hf_optim.Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    with caplog.at_level(logging.WARNING):
        trainer._save_optimizer_and_scheduler(str(tmp_path / "ckpt"))
        trainer._load_optimizer_and_scheduler(str(tmp_path / "ckpt"))
    assert calls == [("save", str(tmp_path / "ckpt")), ("load", str(tmp_path / "ckpt"))]
    assert not (tmp_path / "ckpt").exists()
    assert any("FSDP" in r.getMessage() for r in caplog.records)
