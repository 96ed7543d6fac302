"""Helpers shared by the transformers integration tests (models, arguments, decay checks, fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

HF_OPTIM_NAMES = ("adamw_hf", "adam_weight_decay", "bert_adam", "openai_adam")


ROOT = Path(__file__).resolve().parents[2]
HF_OPTIM_NAMES = ("adamw_hf", "adam_weight_decay", "bert_adam", "openai_adam")


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def no_decay_by_bert_naming(name: str) -> bool:
    """Trainer's rule for BERT, written out: biases and LayerNorm weights get no weight decay."""
    return "bias" in name or "LayerNorm" in name


def zero_grad_step(model, optimizer) -> dict[str, torch.Tensor]:
    """One optimizer step with all-zero gradients; returns the parameters before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


def assert_decoupled_decay(
    model, before, *, lr: float, weight_decay: float, excluded=no_decay_by_bert_naming
):
    """After a zero-gradient step the Adam term is 0: decayed weights are ``p * (1 - lr * wd)``, the rest as before."""
    for n, p in model.named_parameters():
        factor = 1.0 if excluded(n) else 1.0 - lr * weight_decay
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)


def start_python(args: list[str], *, autoload: bool, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("HF_OPTIM_DISABLE_AUTOLOAD", None)
    if not autoload:
        env["HF_OPTIM_DISABLE_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
