"""Converting a Trainer / Accelerate checkpoint's pickled optimizer state into the hf_optim format.

Reads ``optimizer.pt`` or ``optimizer.bin`` (and ``scheduler.pt`` / ``scheduler.bin`` if present) with
``torch.load(weights_only=True)`` only (which refuses arbitrary objects) and writes ``optimizer.safetensors``
and ``scheduler.json`` beside them (or into ``output``), recording in the checkpoint's ``info`` what it
inferred (optimizer class from the state / group keys, the Trainer's step) and what it could not.

Parameter names: a torch optimizer state dict numbers parameters; names are only in it if the optimizer was
given ``named_parameters()`` (torch >= 2.6 keeps ``param_names``). Otherwise ``names_from`` supplies them:

- a text file with one name per line (or a JSON list), in the optimizer's order (group by group);
- a model directory with ``config.json`` (e.g. the Trainer checkpoint itself): the model is built on the meta
  device with transformers and named the way ``Trainer.create_optimizer`` groups parameters: decay parameters
  (``Trainer.get_decay_parameter_names``) then the others, each in ``named_parameters()`` order, trainable only.

Without names the state is keyed by index; ``load_state`` then matches parameters by position.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError

from hf_optim.errors import CheckpointError
from hf_optim.legacy.checkpoints import LEGACY_SCHEDULE_MODULE, load_pickled_legacy_state_dict
from hf_optim.state.format import parse_json
from hf_optim.state.pickled import (
    check_stored_sizes,
    check_torch_state_dict,
    infer_optimizer_class,
    torch_load,
)
from hf_optim.state.save import save_state_dict
from hf_optim.state.zero import (
    convert_deepspeed_checkpoint,
    find_deepspeed_checkpoint,
    read_stage0_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZER_FILES",
    "SCHEDULER_FILES",
    "convert_checkpoint",
    "convert_deepspeed_checkpoint",
    "infer_optimizer_class",
]

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt", "scheduler.bin")
# state entries that have the parameter's shape, used to check that names were assigned correctly
_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")


def _load_optimizer_file(path: str) -> Any:
    """``torch.load(weights_only=True)``; a pytorch-pretrained-bert ``BertAdam`` / ``OpenAIAdam`` state dict,
    whose groups hold pickled schedule objects, through the legacy reader's allow-list of exactly those classes
    (rebuilt as hf_optim's schedules, which the checkpoint then stores as JSON)."""
    try:
        return torch_load(path)
    except CheckpointError:
        if not _pickles_legacy_schedules(path):
            raise
    return load_pickled_legacy_state_dict(path)


def _pickles_legacy_schedules(path: str) -> bool:
    """Whether the pickle in a torch zip archive names pytorch-pretrained-bert's schedule module (a byte search
    in its ``data.pkl``; nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            return name is not None and LEGACY_SCHEDULE_MODULE.encode() in archive.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


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
    model_cls = None
    if architectures:
        name = architectures[0]
        model_cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if not (
            isinstance(model_cls, type)
            and issubclass(model_cls, torch.nn.Module)
            and ("Model" in name or "For" in name)
        ):
            raise CheckpointError(
                f"{os.path.join(model_dir, 'config.json')}: architectures[0] = {str(name)[:100]!r} is not a "
                "transformers model class"
            )
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
    tag: str | None = None,
) -> list[str]:
    """Convert ``optimizer.pt|.bin`` (+ ``scheduler.pt|.bin``) in ``checkpoint_dir``, or the stock DeepSpeed ZeRO
    checkpoint there (:func:`~hf_optim.state.zero.convert_deepspeed_checkpoint`, which ``tag`` selects for); returns
    the files written."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no such checkpoint directory: {checkpoint_dir}")
    opt_path = _find(checkpoint_dir, OPTIMIZER_FILES)
    module: dict[str, tuple[int, ...]] | None = None  # DeepSpeed without ZeRO: the module's parameters
    deepspeed_scheduler = None
    if opt_path is None:
        folder = find_deepspeed_checkpoint(checkpoint_dir, tag)
        if folder is None:
            raise FileNotFoundError(f"no {' or '.join(OPTIMIZER_FILES)} in {checkpoint_dir}")
        stage0 = read_stage0_checkpoint(folder)
        if stage0 is None:
            if names_from is not None:
                logger.info("a DeepSpeed ZeRO checkpoint names its parameters; ignoring --names-from")
            return convert_deepspeed_checkpoint(
                checkpoint_dir, output=output, tag=tag, optimizer_class=optimizer_class
            )
        opt_path, state_dict, module, deepspeed_scheduler = stage0
    else:
        state_dict = _load_optimizer_file(opt_path)
    check_torch_state_dict(state_dict, opt_path)
    check_stored_sizes(state_dict, opt_path)
    groups = state_dict["param_groups"]
    sizes = [len(g["params"]) for g in groups]

    names: list[list[str | None]] = [[None] * n for n in sizes]
    shapes: dict[str, torch.Tensor] = {}
    if all(g.get("param_names") for g in groups if g["params"]):
        names = [list(g.get("param_names") or []) for g in groups]
        if [len(n) for n in names] != sizes or not all(isinstance(n, str) for g in names for n in g):
            raise CheckpointError(f"{opt_path}: 'param_names' do not match 'params'")
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
    elif module is not None:
        # DeepSpeed without ZeRO: the optimizer built on the module's parameters, in order
        names_by_module, module_shapes = _module_names(state_dict, module)
        if names_by_module is not None:
            names, shapes = names_by_module, module_shapes

    for g, group in enumerate(groups):
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

    info: dict[str, str] = {"source": os.path.basename(opt_path)}
    if optimizer_class is None:
        optimizer_class, reason = infer_optimizer_class(state_dict)
        info["optimizer_class"] = f"inferred: {reason}" if optimizer_class else f"unknown: {reason}"
    else:
        info["optimizer_class"] = "given"
    named = bool(names) and all(n is not None for g in names for n in g)
    if named and module is not None and names_from is None and shapes:
        info["parameter_names"] = "from the DeepSpeed module's parameters, in order (their shapes match)"
    elif named:
        info["parameter_names"] = "from --names-from" if names_from is not None else "from the state dict"
    elif module is not None:
        info["parameter_names"] = (
            "unknown: the DeepSpeed module's parameters do not match the optimizer's in number and shape; "
            "state keyed by index, matched by position on load"
        )
    else:
        info["parameter_names"] = "unknown: state keyed by index, matched by position on load"
    info["parameter_shapes"] = "from the model" if shapes else "unknown: not checked on load"
    scheduler: dict[str, Any] = {}
    sched_path = _find(checkpoint_dir, SCHEDULER_FILES)
    if deepspeed_scheduler is not None:
        check_stored_sizes(deepspeed_scheduler, opt_path)
        scheduler = {"scheduler_state": deepspeed_scheduler}
        info["scheduler"] = "from the DeepSpeed model states' lr_scheduler; class and schedule name unknown"
    elif sched_path is not None:
        sched_state = torch_load(sched_path)
        if not isinstance(sched_state, Mapping) or not all(isinstance(k, str) for k in sched_state):
            raise CheckpointError(f"{sched_path} is not a scheduler state_dict")
        check_stored_sizes(sched_state, sched_path)
        scheduler = {"scheduler_state": sched_state}
        info["scheduler"] = f"from {os.path.basename(sched_path)}; class and schedule name unknown"
    else:
        info["scheduler"] = "none: no scheduler.pt / scheduler.bin"
    trainer_state = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if os.path.isfile(trainer_state):
        step = _trainer_step(trainer_state)
        if step is not None:
            info["trainer_global_step"] = str(step)
    for g, group in enumerate(groups):
        if named:
            group["param_names"] = list(names[g])
        else:
            group.pop("param_names", None)
    shape_lists = (
        [[list(shapes[n].shape) if n in shapes else None for n in g] for g in names] if shapes else None
    )
    # fsync (unlike save_state's default): a one-off conversion whose output is then relied on instead of the
    # pickled files; flushing it costs once and makes it survive a power loss
    try:
        written = save_state_dict(
            output or checkpoint_dir,
            state_dict,
            param_shapes=shape_lists,
            optimizer_class=optimizer_class,
            max_shard_size=max_shard_size,
            metadata=info,
            fsync=True,
            **scheduler,
        )
    except (ValueError, TypeError, SafetensorError) as err:
        # a value the format cannot hold (refused before anything is written), or more than one safetensors
        # header holds (the save leaves nothing behind either)
        if isinstance(err, CheckpointError):
            raise
        source = f"{opt_path} (or {sched_path})" if sched_path else opt_path
        raise CheckpointError(f"{source} cannot be converted: {err}") from None
    logger.info(
        "converted %s%s -> %s; state keyed by %s",
        opt_path,
        f" and {sched_path}" if sched_path else "",
        ", ".join(os.path.basename(w) for w in written),
        "name" if named else "index",
    )
    return written


def _module_names(
    state_dict: Mapping[str, Any], module: Mapping[str, tuple[int, ...]]
) -> tuple[list[list[str | None]] | None, dict[str, torch.Tensor]]:
    """The module's parameter names, group by group, when the optimizer holds exactly the module's parameters in
    order: same number, and every shaped state entry (``exp_avg``, ...) of the parameter's shape."""
    groups = state_dict["param_groups"]
    flat = list(module)
    if len(flat) != sum(len(g["params"]) for g in groups):
        return None, {}
    it = iter(flat)
    names: list[list[str | None]] = [[next(it) for _ in g["params"]] for g in groups]
    for group, group_names in zip(groups, names, strict=True):
        for index, name in zip(group["params"], group_names, strict=True):
            state = state_dict["state"].get(index, {})
            for key in _SHAPED_STATE:
                value = state.get(key)
                if isinstance(value, torch.Tensor) and tuple(value.shape) != module[str(name)]:
                    return None, {}
    return names, {n: torch.empty(s, device="meta") for n, s in module.items()}


def _trainer_step(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            doc = parse_json(f.read(), path)
    except (OSError, CheckpointError):
        return None
    step = doc.get("global_step") if isinstance(doc, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
