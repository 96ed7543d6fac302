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

When resuming, the schedule (``--lr_scheduler_type``, ``--warmup_steps``, ``--max_steps``,
``--lr_scheduler_kwargs``) is taken from the checkpoint's ``scheduler.json`` (its ``name`` and ``kwargs``, see
docs/FORMAT.md) unless given on the command line; a given value that differs from the checkpoint's is used, with
a warning. Every logging step prints ``step N/M: loss ..., learning rate ...``; ``--step_log FILE`` also writes
those values as JSON lines (what this process computed: a resumed run starts after the checkpoint's step).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

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
    step_log: str | None = field(
        default=None,
        metadata={
            "help": "write step, loss, learning_rate and grad_norm of every logging step here (JSON lines)"
        },
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

    def on_train_end(self, args, state, control, **kwargs):
        if self.step <= state.global_step < state.max_steps:
            logger.info("stopped after step %d (simulated interruption)", state.global_step)
        return control


class StepLog(TrainerCallback):
    """Report each logged training step: one ``step N/M: ...`` log line and, with ``path``, one JSON line."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path and state.is_world_process_zero:  # this process's steps only: start an empty file
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8"):
                pass
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {
            "step": state.global_step,
            **{k: logs.get(k) for k in ("loss", "learning_rate", "grad_norm")},
        }
        logger.info(
            "step %d/%d: loss %.4f, learning rate %.4g",
            state.global_step,
            state.max_steps,
            record["loss"],
            record["learning_rate"] or 0.0,
        )
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return control


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


# ---- main ------------------------------------------------------------------------------------------------------


# The TrainingArguments fields that describe the schedule, and which key of a schedule's recorded arguments
# (scheduler.json "kwargs") each one comes from; the other recorded arguments go to lr_scheduler_kwargs.
SCHEDULE_FIELDS = ("lr_scheduler_type", "warmup_steps", "max_steps", "lr_scheduler_kwargs")
SCHEDULE_KEYS = {"warmup_steps": "num_warmup_steps", "max_steps": "num_training_steps"}
# Options that replace a schedule field (given on the command line: that field is not taken from the checkpoint).
EQUIVALENTS = {"max_steps": ("num_train_epochs",)}


def decode_value(node: Any, where: str) -> Any:
    """A value of hf_optim's JSON encoding (docs/FORMAT.md, "Values") as Python; tensors are refused."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode_value(item, where) for item in node]
    if isinstance(node, dict) and len(node) == 1:
        ((tag, inner),) = node.items()
        if tag == "dict" and isinstance(inner, dict):
            return {str(k): decode_value(v, where) for k, v in inner.items()}
        if tag == "tuple" and isinstance(inner, list):
            return tuple(decode_value(item, where) for item in inner)
        if tag == "float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
    raise ValueError(f"{where}: unsupported value {json.dumps(node)[:80]}")


def checkpoint_schedule(checkpoint: str) -> dict[str, Any] | None:
    """The TrainingArguments schedule fields recorded in ``checkpoint/scheduler.json``, or None when it records
    no schedule name (no such file, or a scheduler that is not one of hf_optim's)."""
    path = os.path.join(checkpoint, hf_optim.SCHEDULER_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != "hf_optim.scheduler":
        raise ValueError(f"{path} is not an hf_optim scheduler.json")
    name = doc.get("name")
    if name is None:
        return None
    kwargs = decode_value(doc.get("kwargs") or {"dict": {}}, path)
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ValueError(f"{path}: expected a schedule name and a dictionary of arguments")
    values: dict[str, Any] = {"lr_scheduler_type": name}
    for arg_field, key in SCHEDULE_KEYS.items():
        value = kwargs.pop(key, None)
        if value is not None:
            values[arg_field] = value
    values["lr_scheduler_kwargs"] = kwargs
    return values


def _schedule_defaults(name: str) -> dict[str, Any]:
    """The default values of the schedule's own arguments (those in lr_scheduler_kwargs)."""
    try:
        params = inspect.signature(hf_optim.get_scheduler_info(name).factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    skip = {"optimizer", "last_epoch", *SCHEDULE_KEYS.values()}
    return {p.name: p.default for p in params if p.name not in skip and p.default is not p.empty}


def _differs(arg_field: str, given: Any, recorded: Any, values: dict[str, Any]) -> bool:
    if arg_field == "lr_scheduler_kwargs":
        given = json.loads(given) if isinstance(given, str) else dict(given or {})
        name = str(values.get("lr_scheduler_type"))
        defaults = _schedule_defaults(name) if name in hf_optim.list_schedulers() else {}
        return {**defaults, **recorded} != {**defaults, **given}
    if arg_field == "warmup_steps":
        given = float(given)
        total = values.get("max_steps")
        if given < 1 and isinstance(total, int) and total > 0:  # a ratio, as TrainingArguments reads it
            given = math.ceil(total * given)
        return given != recorded
    if arg_field == "max_steps":
        return int(given) != recorded
    return str(given) != str(recorded)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def fill_schedule_from_checkpoint(given: dict[str, Any], checkpoint: str) -> tuple[dict[str, Any], list[str]]:
    """The schedule fields to add to the arguments (those not ``given``), and one warning per given field whose
    value differs from the checkpoint's."""
    recorded = checkpoint_schedule(checkpoint)
    if recorded is None:
        return {}, []
    effective = {**recorded, **{k: v for k, v in given.items() if k in SCHEDULE_FIELDS and v is not None}}
    added, warnings = {}, []
    for arg_field, value in recorded.items():
        replaced_by = [name for name in EQUIVALENTS.get(arg_field, ()) if given.get(name) is not None]
        if given.get(arg_field) is None and not replaced_by:
            added[arg_field] = value
        elif given.get(arg_field) is not None and _differs(arg_field, given[arg_field], value, effective):
            shown = _show(given[arg_field])
            warnings.append(
                f"--{arg_field} {shown} differs from the checkpoint's {json.dumps(value)} "
                f"({os.path.join(checkpoint, hf_optim.SCHEDULER_NAME)}): using {shown}"
            )
    return added, warnings


def local_checkpoint(value: str | None, token: str | None) -> str | None:
    """``--resume_from_checkpoint`` as a local folder: ``hf://`` URLs are downloaded (into the HF cache, where
    Trainer's own download finds them)."""
    if not value or not value.startswith(("hf://", "https://", "http://")):
        return value
    return hf_optim.download_checkpoint(value, token=token)


def parse(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, ScriptArguments, TrainingArguments]:
    """Parse the command line (or one JSON file of arguments); when resuming, the schedule fields not given are
    taken from the checkpoint."""
    dataclasses = (ModelArguments, DataArguments, ScriptArguments, TrainingArguments)
    argv = sys.argv[1:] if argv is None else argv
    from_json = len(argv) == 1 and argv[0].endswith(".json")
    if from_json:
        with open(os.path.abspath(argv[0]), encoding="utf-8") as f:
            given = json.load(f)
    else:
        # The same parser with the schedule fields defaulting to None: None means "not on the command line".
        probe = HfArgumentParser(dataclasses)
        watched = (*SCHEDULE_FIELDS, *(name for names in EQUIVALENTS.values() for name in names))
        probe.set_defaults(**dict.fromkeys(watched))
        given = {k: getattr(v, "value", v) for k, v in vars(probe.parse_known_args(argv)[0]).items()}
    checkpoint = local_checkpoint(given.get("resume_from_checkpoint"), given.get("hub_token"))
    added: dict[str, Any] = {}
    if checkpoint:
        added, warnings = fill_schedule_from_checkpoint(given, checkpoint)
        for warning in warnings:
            logger.warning("%s", warning)
        if added:
            logger.info("schedule from the checkpoint's %s: %s", hf_optim.SCHEDULER_NAME, json.dumps(added))

    parser = HfArgumentParser(dataclasses)
    if from_json:
        return parser.parse_dict({**given, **added})
    extra = []
    for key, value in added.items():
        extra += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return parser.parse_args_into_dataclasses(args=[*argv, *extra])


def main(argv: list[str] | None = None) -> dict[str, object]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("train_trainer", "hf_optim"):  # our progress messages; other libraries stay at WARNING
        logging.getLogger(name).setLevel(logging.INFO)
    model_args, data_args, script_args, training_args = parse(argv)
    if not training_args.should_log:
        for name in ("train_trainer", "hf_optim"):
            logging.getLogger(name).setLevel(logging.WARNING)
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

    callbacks: list[TrainerCallback] = [StepLog(script_args.step_log)]
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
