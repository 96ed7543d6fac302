#!/usr/bin/env python
"""Fine-tune a tiny BERT for sentence classification with transformers' Trainer and hf_optim's optimizers.

Nothing is downloaded: the model is built from a ``BertConfig`` and the data set is synthetic (short movie-review
sentences generated from word lists with a fixed seed, label = positive / negative, with negations that flip the
label), tokenized with a word-level vocabulary built here. Written in the style of transformers' examples:
every ``TrainingArguments`` option works (``--optim``, ``--lr_scheduler_type``, ``--push_to_hub``,
``--resume_from_checkpoint``, ...).

    python scripts/train_trainer.py --output_dir outputs/run --optim adamw_hf --lr_scheduler_type cosine \\
        --max_steps 80 --warmup_steps 8 --learning_rate 5e-4 --save_steps 20 --logging_steps 10

Checkpoints hold ``optimizer.safetensors`` + ``scheduler.json`` (``hf_optim.Trainer``; pass
``--trainer_class transformers`` for the stock Trainer). ``--resume_from_checkpoint`` takes a local folder or
``hf://USER/REPO[@REVISION]/last-checkpoint``. ``--stop_after_step N`` simulates an interruption: training stops
right after step N, once that step's checkpoint is saved (and pushed, with ``--push_to_hub``). A run that
finishes saves its final weights to ``output_dir/model.safetensors`` and ``output_dir/trainer_state.json``
(``log_history``: loss and learning rate at every logging step, those before a resume included).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers import Trainer as TransformersTrainer

import hf_optim

logger = logging.getLogger("train_trainer")

POSITIVE = (
    "good",
    "great",
    "excellent",
    "wonderful",
    "fantastic",
    "amazing",
    "superb",
    "lovely",
    "brilliant",
    "delightful",
    "charming",
    "moving",
)
NEGATIVE = (
    "bad",
    "terrible",
    "awful",
    "horrible",
    "poor",
    "dreadful",
    "boring",
    "disappointing",
    "weak",
    "mediocre",
    "dull",
    "clumsy",
)
SUBJECTS = (
    "movie",
    "film",
    "plot",
    "acting",
    "story",
    "music",
    "ending",
    "cast",
    "script",
    "scenery",
    "dialogue",
    "soundtrack",
)
INTENSIFIERS = ("", "really", "very", "truly", "quite", "rather")
TEMPLATES = (
    "the {s} was {i} {a}",
    "the {s} was not {i} {a}",
    "what a {a} {s}",
    "i thought the {s} was {i} {a}",
    "i did not think the {s} was {a}",
    "honestly the {s} is {i} {a}",
    "the {s} is never {a}",
    "a {i} {a} {s} overall",
)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@dataclass
class ModelArguments:
    hidden_size: int = field(default=64, metadata={"help": "BERT hidden size"})
    num_hidden_layers: int = field(default=2, metadata={"help": "number of transformer layers"})
    num_attention_heads: int = field(default=2, metadata={"help": "attention heads per layer"})
    intermediate_size: int = field(default=128, metadata={"help": "feed-forward size"})


@dataclass
class DataArguments:
    num_train_examples: int = field(default=640, metadata={"help": "synthetic training sentences"})
    num_eval_examples: int = field(default=160, metadata={"help": "synthetic evaluation sentences"})
    max_seq_length: int = field(default=16, metadata={"help": "tokens per example, [CLS] and [SEP] included"})
    data_seed_offset: int = field(default=1234, metadata={"help": "the data set uses seed + this offset"})


@dataclass
class ScriptArguments:
    trainer_class: str = field(
        default="hf_optim",
        metadata={
            "help": "hf_optim (safetensors optimizer state) or transformers (stock Trainer)",
            "choices": ["hf_optim", "transformers"],
        },
    )
    stop_after_step: int | None = field(
        default=None,
        metadata={"help": "simulate an interruption: stop (after saving a checkpoint) at this step"},
    )


# ---- data ------------------------------------------------------------------------------------------------------


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs; label 1 = positive. Negated templates flip the adjective's polarity."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        positive = rng.random() < 0.5
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        negated = " not " in f" {template} " or " never " in f" {template} "
        text = template.format(s=rng.choice(SUBJECTS), a=adjective, i=rng.choice(INTENSIFIERS))
        out.append((" ".join(text.split()), int(positive != negated)))
    return out


def build_vocab() -> dict[str, int]:
    words = set()
    for template in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update(POSITIVE + NEGATIVE + SUBJECTS + INTENSIFIERS)
    words.discard("")
    return {token: i for i, token in enumerate(SPECIAL + tuple(sorted(words)))}


class SentenceDataset(torch.utils.data.Dataset):
    """Word-level tokenized sentences: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, pairs: list[tuple[str, int]], vocab: dict[str, int], max_length: int) -> None:
        self.items = []
        for text, label in pairs:
            ids = [vocab["[CLS]"], *(vocab.get(w, vocab["[UNK]"]) for w in text.split())][: max_length - 1]
            ids.append(vocab["[SEP]"])
            mask = [1] * len(ids) + [0] * (max_length - len(ids))
            ids = ids + [vocab["[PAD]"]] * (max_length - len(ids))
            self.items.append(
                {
                    "input_ids": torch.tensor(ids),
                    "attention_mask": torch.tensor(mask),
                    "labels": torch.tensor(label),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


# ---- callbacks -------------------------------------------------------------------------------------------------


class StopAfterStep(TrainerCallback):
    """Stop after optimizer step ``step``, making Trainer save (and push) that step's checkpoint first."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


# ---- main ------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, ScriptArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    model_args, data_args, script_args, training_args = parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("train_trainer", "hf_optim"):  # our progress messages; other libraries stay at WARNING
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    logger.info(
        "hf_optim %s, optimizer %s, schedule %s",
        hf_optim.__version__,
        training_args.optim.value,
        training_args.lr_scheduler_type.value,
    )

    vocab = build_vocab()
    data_seed = training_args.seed + data_args.data_seed_offset
    train_pairs = make_sentences(data_args.num_train_examples, data_seed)
    eval_pairs = make_sentences(data_args.num_eval_examples, data_seed + 1)
    train_dataset = SentenceDataset(train_pairs, vocab, data_args.max_seq_length)
    eval_dataset = SentenceDataset(eval_pairs, vocab, data_args.max_seq_length)

    set_seed(training_args.seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        max_position_embeddings=max(32, data_args.max_seq_length),
        num_labels=2,
    )
    model = BertForSequenceClassification(config)

    callbacks: list[TrainerCallback] = []
    if script_args.stop_after_step is not None:
        callbacks.append(StopAfterStep(script_args.stop_after_step))
    trainer_cls = hf_optim.Trainer if script_args.trainer_class == "hf_optim" else TransformersTrainer
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    summary: dict[str, object] = {
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_early": stopped_early,
        "train_loss": result.training_loss,
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,
        "scheduler": type(trainer.lr_scheduler).__name__,
    }
    if not stopped_early:
        if training_args.do_eval:
            summary["eval"] = trainer.evaluate()
        trainer.save_model()
        trainer.save_state()
    logger.info("summary: %s", json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
