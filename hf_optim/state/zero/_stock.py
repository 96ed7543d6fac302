"""Stock DeepSpeed checkpoint folders: finding one, its files by rank, and reading its pickles safely.

``engine.save_checkpoint(dir, tag)`` writes ``dir/latest`` (naming the tag) and ``dir/<tag>/``: with ZeRO,
``mp_rank_00_model_states.pt`` (stage 1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt`` (stage 3) and one
``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank (``bf16_`` prefixed under bf16); without ZeRO,
only ``mp_rank_00_model_states.pt``, holding the optimizer too. Their pickles are read through an exact
allow-list of the globals DeepSpeed writes, its four classes built as inert stand-ins: no DeepSpeed code runs,
and DeepSpeed need not be installed.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.io import open_file
from hf_optim.state.pickled import load_torch_archive

__all__ = [
    "DEEPSPEED_GLOBALS",
    "DynamicLossScaler",
    "FragmentAddress",
    "LossScaler",
    "find_deepspeed_checkpoint",
    "load_file",
    "read_stage0_checkpoint",
    "zero_files",
]

_MODEL_FILE_RE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_OPTIM_FILE_RE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_TAG_RE = re.compile(r"[\w][\w.\-]*")


class _Record:
    """A stand-in for a small DeepSpeed class: only numbers, booleans, strings and dtypes, checked as they
    arrive."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, bool | int | float | str | torch.dtype))
            for k, v in state.items()
        ):
            raise TypeError(f"{type(self).__name__}: unexpected pickled state")
        self.__dict__.update(state)


class LossScaler(_Record):
    """Stands in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler``."""


class DynamicLossScaler(_Record):
    """Stands in for ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``."""


class FragmentAddress(_Record):
    """Stands in for ``deepspeed.utils.tensor_fragment.fragment_address`` (``numel``, ``start``)."""


def _zero_stage(value: Any) -> int:
    """Stands in for ``deepspeed.runtime.zero.config.ZeroStageEnum``: its value, checked."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3:
        raise TypeError(f"ZeroStageEnum: unexpected value {value!r}")
    return value


#: every global besides tensors a DeepSpeed 0.19 checkpoint pickles, and what is built in its place: its four
#: classes as stand-ins, and the dtypes its fp16 / bf16 loss scaler records
DEEPSPEED_GLOBALS: Mapping[str, Any] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScaler,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _zero_stage,
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
    **{f"torch.{d}": getattr(torch, d) for d in ("float16", "bfloat16", "float32")},
}


def find_deepspeed_checkpoint(path: str, tag: str | None = None) -> str | None:
    """The ``global_stepN`` folder of the DeepSpeed checkpoint at ``path``, else ``None``.

    ``path`` may be that folder, or the folder holding it (a Trainer ``checkpoint-N``, DeepSpeed's save dir):
    then ``tag``, else the tag named in its ``latest`` file, else its only ``global_step*`` folder."""
    if not os.path.isdir(path):
        return None
    if _has_deepspeed_files(path):
        return path
    named_by = "tag="
    if tag is None and os.path.lexists(os.path.join(path, "latest")):
        named_by = os.path.join(path, "latest")
        f = open_file(named_by, roots=[path])  # not a link out of the folder: its text would be shown
        try:
            tag = os.pread(f.fd, 256, 0).decode("utf-8", errors="replace").strip()
        finally:
            f.close()
    if tag is not None:
        if not _TAG_RE.fullmatch(tag):
            raise CheckpointError(f"{named_by}: the DeepSpeed tag it names is not a folder name in {path}")
        candidate = _inside(path, tag)
        if not _has_deepspeed_files(candidate):
            raise CheckpointError(f"{candidate}: no DeepSpeed checkpoint files")
        return candidate
    steps = sorted(
        e
        for e in os.listdir(path)
        if e.startswith("global_step") and _has_deepspeed_files(os.path.join(path, e))
    )
    if len(steps) > 1:
        raise CheckpointError(
            f"{path} holds several DeepSpeed checkpoints ({', '.join(steps[:5])}) and no 'latest' file: "
            "name one with tag="
        )
    return _inside(path, steps[0]) if steps else None


def _inside(path: str, tag: str) -> str:
    """``path/tag``, which must be a real folder of ``path`` (not a link to one elsewhere)."""
    candidate = os.path.join(path, tag)
    if os.path.islink(candidate) or os.path.dirname(os.path.realpath(candidate)) != os.path.realpath(path):
        raise CheckpointError(f"{candidate} is a link to {os.path.realpath(candidate)}: refused")
    return candidate


def read_stage0_checkpoint(folder: str) -> tuple[str, Any, dict[str, tuple[int, ...]], Any] | None:
    """DeepSpeed without ZeRO keeps the client optimizer's ``state_dict()`` in ``mp_rank_00_model_states.pt``:
    (that file, the state dict, the module's parameters in order as name -> shape (buffers left out), the
    scheduler state DeepSpeed stepped or None). None when the folder holds ZeRO partitions instead."""
    entries = os.listdir(folder)
    if any(_OPTIM_FILE_RE.fullmatch(e) for e in entries) or "mp_rank_00_model_states.pt" not in entries:
        return None
    path = os.path.join(folder, "mp_rank_00_model_states.pt")
    doc = load_file(path, folder, "model states file")
    if not isinstance(doc, dict) or not isinstance(doc.get("optimizer"), dict):
        raise CheckpointError(f"{path}: no optimizer state (DeepSpeed without ZeRO keeps it here)")
    module, buffers = doc.get("module"), doc.get("buffer_names") or []
    if not isinstance(module, dict) or not isinstance(buffers, list):
        raise CheckpointError(f"{path}: 'module' is not a state dict")
    shapes = {
        name: tuple(t.shape)
        for name, t in module.items()
        if isinstance(name, str) and isinstance(t, torch.Tensor) and name not in buffers
    }
    scheduler = doc.get("lr_scheduler")
    return path, doc["optimizer"], shapes, scheduler if isinstance(scheduler, dict) and scheduler else None


def _has_deepspeed_files(folder: str) -> bool:
    return os.path.isdir(folder) and any(
        _MODEL_FILE_RE.fullmatch(e) or _OPTIM_FILE_RE.fullmatch(e) for e in os.listdir(folder)
    )


def load_file(path: str, folder: str, what: str) -> Any:
    """A DeepSpeed pickle inside ``folder``, memory-mapped, through :data:`DEEPSPEED_GLOBALS` only."""
    f = open_file(path, roots=[folder])
    try:
        return load_torch_archive(
            path, f"a DeepSpeed {what}", allowed=DEEPSPEED_GLOBALS, reader_path=f.reader_path()
        )
    finally:
        f.close()


def zero_files(folder: str) -> tuple[str, list[str]]:
    """The model-states file to read and the optimizer-states files, by rank; every name checked."""
    model, optim = {}, {}
    for entry in os.listdir(folder):
        if m := _MODEL_FILE_RE.fullmatch(entry):
            model[(int(m.group(1) or 0), int(m.group(2)))] = entry
        elif m := _OPTIM_FILE_RE.fullmatch(entry):
            optim[(int(m.group(2)), int(m.group(3)), bool(m.group(1)))] = entry
    if any(mp for _, mp in model) or any(mp for _, mp, _ in optim):
        raise CheckpointError(
            f"{folder}: a checkpoint with tensor or pipeline parallelism (mp_rank > 0): not supported"
        )
    if not optim:
        raise CheckpointError(
            f"{folder}: no zero_pp_rank_*_optim_states.pt: not a ZeRO checkpoint (without ZeRO DeepSpeed keeps "
            "the optimizer in mp_rank_00_model_states.pt: hf_optim.state.convert.convert_checkpoint reads it)"
        )
    if len({bf16 for _, _, bf16 in optim}) > 1:
        raise CheckpointError(f"{folder}: holds both bf16_zero_pp_rank_* and zero_pp_rank_* files")
    ranks = sorted(r for r, _, _ in optim)
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{folder}: the optimizer states of rank {missing[0]} are missing")
    if (0, 0) not in model:
        raise CheckpointError(f"{folder}: no model states file (mp_rank_00_model_states.pt)")
    by_rank = {r: name for (r, _, _), name in optim.items()}
    paths = [os.path.join(folder, model[(0, 0)]), *(os.path.join(folder, by_rank[r]) for r in ranks)]
    seen: dict[tuple[int, int], str] = {}
    for path in paths:  # one file read as two ranks would convert its data twice
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file (a link?): refused")
        if (st.st_dev, st.st_ino) in seen:
            raise CheckpointError(f"{path} is the same file as {seen[st.st_dev, st.st_ino]}: refused")
        seen[st.st_dev, st.st_ino] = path
    return paths[0], paths[1:]
