"""``hf-optim convert``: turn a Trainer / Accelerate checkpoint's pickled optimizer state into safetensors.

Reads ``optimizer.pt`` or ``optimizer.bin`` (and ``scheduler.pt`` / ``scheduler.bin`` if present) with
``torch.load(weights_only=True)`` only (which refuses arbitrary objects) and writes ``optimizer.safetensors``
and ``scheduler.json`` beside them (or into ``--output``).

Parameter names: a torch optimizer state dict numbers parameters; names are only in it if the optimizer was
given ``named_parameters()`` (torch >= 2.6 keeps ``param_names``). Otherwise ``--names-from`` supplies them:

- a text file with one name per line (or a JSON list), in the optimizer's order (group by group);
- a model directory with ``config.json`` (e.g. the Trainer checkpoint itself): the model is built on the meta
  device with transformers and named the way ``Trainer.create_optimizer`` groups parameters: decay parameters
  (``Trainer.get_decay_parameter_names``) then the others, each in ``named_parameters()`` order, trainable only.
  This assumes the default Trainer optimizer grouping; a custom ``create_optimizer`` needs the text file.

Without names the state is keyed by index; ``load_state`` then matches parameters by position.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_optim.serialization import (
    SCHEDULER_NAME,
    _optimizer_payload,
    _ParamRecord,
    _parse_max_shard_size,
    _save_payload,
    _scheduler_document_from_state,
)

logger = logging.getLogger(__name__)

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt", "scheduler.bin")
# state entries that have the parameter's shape, used to check that names were assigned correctly
_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Trainer / Accelerate optimizer.pt / .bin to safetensors",
        description="Convert optimizer.pt / optimizer.bin and scheduler.pt / scheduler.bin of a transformers "
        "Trainer or Accelerate checkpoint (read with torch.load(weights_only=True)) into optimizer.safetensors "
        "and scheduler.json beside them.",
    )
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR")
    parser.add_argument(
        "--names-from",
        metavar="MODEL_DIR_OR_FILE",
        help="parameter names: a file with one name per line (optimizer order), or a model directory with "
        "config.json whose parameters are grouped as transformers' Trainer does",
    )
    parser.add_argument("--output", metavar="DIR", help="write here instead of CHECKPOINT_DIR")
    parser.add_argument("--optimizer-class", help="record this optimizer class, e.g. torch.optim.adamw.AdamW")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard the state above this size (default 5GB)"
    )
    parser.set_defaults(func=run)


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(read with torch.load(weights_only=True)): {err}"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint: {err}") from None


def _find(directory: str, candidates: Sequence[str]) -> str | None:
    found = [name for name in candidates if os.path.isfile(os.path.join(directory, name))]
    if len(found) > 1:
        raise ValueError(f"{directory} holds both {found[0]} and {found[1]}; keep one")
    return os.path.join(directory, found[0]) if found else None


def _names_from_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: expected a JSON list of parameter names")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _trainer_named_groups(model_dir: str) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Names (and meta parameters) grouped as ``transformers.Trainer.create_optimizer`` does."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        raise ValueError(
            "--names-from MODEL_DIR needs transformers (pip install 'hf_optim[transformers]')"
        ) from None
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        model = model_cls(config) if model_cls is not None else transformers.AutoModel.from_config(config)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # does not use self
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]
    return groups, dict(named)


def convert_checkpoint(
    checkpoint_dir: str,
    *,
    names_from: str | None = None,
    output: str | None = None,
    optimizer_class: str | None = None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Convert ``optimizer.pt|.bin`` (+ ``scheduler.pt|.bin``) in ``checkpoint_dir``; returns the files written."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no such checkpoint directory: {checkpoint_dir}")
    opt_path = _find(checkpoint_dir, OPTIMIZER_FILES)
    if opt_path is None:
        raise FileNotFoundError(f"no {' or '.join(OPTIMIZER_FILES)} in {checkpoint_dir}")
    state_dict = _torch_load(opt_path)
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{opt_path} is not an optimizer state_dict (no 'state' / 'param_groups')")
    groups = state_dict["param_groups"]
    sizes = [len(g["params"]) for g in groups]

    names: list[list[str | None]] = [[None] * n for n in sizes]
    shapes: dict[str, torch.Tensor] = {}
    if all(g.get("param_names") for g in groups if g["params"]):
        names = [list(g.get("param_names") or []) for g in groups]
        if names_from is not None:
            logger.info("%s already names its parameters; ignoring --names-from", opt_path)
    elif names_from is not None:
        if os.path.isdir(names_from):
            grouped, shapes = _trainer_named_groups(names_from)
            if [len(g) for g in grouped] != sizes:
                raise ValueError(
                    f"the model in {names_from} gives Trainer groups of sizes {[len(g) for g in grouped]}, but "
                    f"{opt_path} has groups of sizes {sizes}: the optimizer was not built by the default "
                    "Trainer.create_optimizer; pass --names-from NAMES_FILE"
                )
            names = [list(g) for g in grouped]
        else:
            flat = _names_from_file(names_from)
            if len(flat) != sum(sizes):
                raise ValueError(
                    f"{names_from} lists {len(flat)} names but {opt_path} has {sum(sizes)} parameters"
                )
            it = iter(flat)
            names = [[next(it) for _ in range(n)] for n in sizes]

    records: list[list[_ParamRecord]] = []
    for g, group in enumerate(groups):
        recs = []
        for j, index in enumerate(group["params"]):
            name = names[g][j]
            param = shapes.get(name) if name is not None else None
            shape = list(param.shape) if param is not None else None
            state = state_dict["state"].get(index, {})
            for key in _SHAPED_STATE:
                value = state.get(key)
                if shape is not None and isinstance(value, torch.Tensor) and list(value.shape) != shape:
                    raise ValueError(
                        f"parameter {name!r} has shape {tuple(shape)} in the model but its optimizer state {key!r} "
                        f"has shape {tuple(value.shape)}: the names do not match the optimizer's parameter order"
                    )
            recs.append(_ParamRecord(int(index), name, shape, None))  # training dtype: unknown
        records.append(recs)

    tensors, meta = _optimizer_payload(
        state_dict, records, optimizer_class=optimizer_class, optimizer_name=None
    )
    scheduler_doc = None
    sched_path = _find(checkpoint_dir, SCHEDULER_FILES)
    if sched_path is not None:
        sched_state = _torch_load(sched_path)
        if not isinstance(sched_state, Mapping):
            raise ValueError(f"{sched_path} is not a scheduler state_dict")
        scheduler_doc = _scheduler_document_from_state(sched_state, None, None, None)
    # fsync (unlike save_state's default): a one-off conversion whose output is then relied on instead of the
    # pickled files; flushing it costs once and makes it survive a power loss
    written = _save_payload(
        output or checkpoint_dir,
        tensors,
        meta,
        scheduler_doc=scheduler_doc,
        accumulator_payload=None,
        shard_size=_parse_max_shard_size(max_shard_size),
        fsync=True,
    )
    keyed = "name" if meta["keyed_by"] == "name" else "index (pass --names-from to key by name)"
    logger.info(
        "converted %s%s -> %s; state keyed by %s",
        opt_path,
        f" and {sched_path}" if sched_path else "",
        ", ".join(os.path.basename(w) for w in written),
        keyed,
    )
    if sched_path is None:
        logger.info("no scheduler.pt / scheduler.bin found: no %s written", SCHEDULER_NAME)
    return written


def run(args: argparse.Namespace) -> int:
    convert_checkpoint(
        args.checkpoint_dir,
        names_from=args.names_from,
        output=args.output,
        optimizer_class=args.optimizer_class,
        max_shard_size=args.max_shard_size,
    )
    return 0
