"""``optim="bert_adam"`` / ``"openai_adam"`` through TrainingArguments and Trainer, and a legacy run reproduced.

The reference for the reproduced run is the real pytorch-pretrained-bert BertAdam (tests/legacy/oracles) in a
hand-written loop, as a pytorch-pretrained-bert fine-tuning script had it.
"""

import copy
import warnings

import pytest
import torch

import hf_optim
from hf_optim.legacy import pytorch_pretrained_bert as ours
from tests.legacy.harness import LEGACY

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    kwargs.setdefault("save_strategy", "no")
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def bert_no_decay(name: str) -> bool:
    """The grouping of pytorch-pretrained-bert's run_classifier.py: no decay for biases and LayerNorm."""
    return any(nd in name for nd in ("bias", "LayerNorm.bias", "LayerNorm.weight"))


def test_optim_args_build_bert_adam(tmp_path):
    args = training_args(
        tmp_path,
        optim="bert_adam",
        optim_args="warmup=0.1,t_total=1000,schedule=warmup_linear,max_grad_norm=1.0",
        learning_rate=5e-5,
        weight_decay=0.01,
        adam_beta1=0.85,
        adam_epsilon=1e-6,
    )
    model = tiny_bert()
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is hf_optim.BertAdam
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["schedule"] == ours.WarmupLinearSchedule(warmup=0.1, t_total=1000)
        assert (group["lr"], group["b1"], group["b2"], group["e"], group["max_grad_norm"]) == (
            5e-5, 0.85, 0.999, 1e-6, 1.0,
        )  # fmt: skip
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if bert_no_decay(names[id(p)]) else 0.01)


def test_optim_args_build_openai_adam(tmp_path):
    args = training_args(
        tmp_path,
        optim="openai_adam",
        optim_args="schedule=warmup_cosine,warmup=0.2,t_total=50,vector_l2=true",
    )
    optimizer = Trainer(model=tiny_bert(), args=args).create_optimizer()
    assert type(optimizer) is hf_optim.OpenAIAdam
    group = optimizer.param_groups[0]
    assert group["schedule"] == ours.WarmupCosineSchedule(warmup=0.2, t_total=50)
    assert group["vector_l2"] is True and group["e"] == args.adam_epsilon


def test_create_optimizer_from_the_registry():
    model = tiny_bert()
    optimizer = hf_optim.create_optimizer("bert_adam", model, lr=5e-5, warmup=0.1, t_total=1000)
    assert type(optimizer) is hf_optim.BertAdam and optimizer.hf_optim_name == "bert_adam"
    decay = {
        n for n, p in model.named_parameters() if any(p is q for q in optimizer.param_groups[0]["params"])
    }
    assert decay == {n for n, _ in model.named_parameters() if not bert_no_decay(n)}
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
    )


def dataset(n=8):
    # identical examples: every batch is the same whatever order Trainer's sampler picks
    example = {
        "input_ids": torch.tensor([2, 7, 11, 5, 3, 0]),
        "attention_mask": torch.tensor([1, 1, 1, 1, 1, 0]),
        "labels": torch.tensor(1),
    }
    return [dict(example) for _ in range(n)]


@pytest.mark.parametrize("impl", ["", ",foreach=false,fused=false"], ids=["default", "reference"])
def test_trainer_reproduces_a_legacy_bert_adam_run(tmp_path, impl):
    """lr_scheduler_type="constant" (the schedule is BertAdam's), max_grad_norm=0 (BertAdam clips per tensor),
    adam_epsilon=1e-6 and weight_decay=0.01 (BertAdam's defaults): the same weights as the legacy loop, bit for
    bit on the reference path."""
    steps, batch = 6, 4
    model = tiny_bert()
    legacy_model = copy.deepcopy(model)

    args = training_args(
        tmp_path,
        optim="bert_adam",
        optim_args="warmup=0.2,t_total=5" + impl,  # runs past t_total, as legacy runs could
        learning_rate=1e-3,
        weight_decay=0.01,
        adam_epsilon=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        per_device_train_batch_size=batch,
        max_steps=steps,
        dataloader_drop_last=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset()).train()

    groups = [
        {
            "params": [p for n, p in legacy_model.named_parameters() if not bert_no_decay(n)],
            "weight_decay": 0.01,
        },
        {"params": [p for n, p in legacy_model.named_parameters() if bert_no_decay(n)], "weight_decay": 0.0},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = LEGACY.BertAdam(groups, lr=1e-3, warmup=0.2, t_total=5)
        legacy_model.train()
        inputs = {
            k: torch.stack([ex[k] for ex in dataset(batch)])
            for k in ("input_ids", "attention_mask", "labels")
        }
        for _ in range(steps):
            legacy_model(**inputs).loss.backward()
            optimizer.step()
            legacy_model.zero_grad()
    for (name, got), expected in zip(model.named_parameters(), legacy_model.parameters(), strict=True):
        if impl:
            assert torch.equal(got.detach(), expected.detach()), name
        else:
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_hf_optim_trainer_checkpoint_keeps_the_schedule_and_resumes_exactly(tmp_path):
    """hf_optim.Trainer saves BertAdam's state (schedule as JSON) in safetensors and resumes bit for bit."""

    def run(output_dir, max_steps, resume=None):
        args = training_args(
            output_dir,
            optim="bert_adam",
            optim_args="schedule=warmup_cosine,warmup=0.2,t_total=2,foreach=false,fused=false",  # past t_total
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            per_device_train_batch_size=4,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=4,
        )
        model = tiny_bert()
        trainer = hf_optim.Trainer(model=model, args=args, train_dataset=dataset())
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, _ = run(tmp_path / "straight", 6)
    _, first = run(tmp_path / "first", 4)
    checkpoint = tmp_path / "first" / "checkpoint-4"
    assert (checkpoint / "optimizer.safetensors").is_file() and not (checkpoint / "optimizer.pt").exists()
    saved_schedule = first.optimizer.param_groups[0]["schedule"]
    assert saved_schedule.warned_for_t_total_at_progress > 1
    assert saved_schedule.get_lr(5, nowarn=True) > 0  # the steps after the checkpoint still move the weights
    resumed, _ = run(tmp_path / "first", 6, resume=str(checkpoint))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach()), name
