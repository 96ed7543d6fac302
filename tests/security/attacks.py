"""Builders of the attack tables: one row of a table is one way to make a checkpoint hostile and what must
happen when it is read. The check that a refused load changed nothing is ``tests.state.helpers.live_snapshot``
/ ``assert_live_unchanged``, shared by every table."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hf_optim
from hf_optim import CheckpointError, load_state, save_state
from tests.state.helpers import assert_live_unchanged, live_snapshot, rewrite_safetensors, trained


@dataclass(frozen=True)
class StateAttack:
    """A single-process checkpoint (``saved``, see ``save_checkpoint``) made hostile by ``make(folder)``, then
    loaded into live objects (``live``, see ``live_objects``). The load raises ``exc`` naming ``file`` (and
    matching ``match``) and changes nothing; then ``then(folder)`` runs (e.g. ``inspect_state`` refuses too).

    With ``harmless`` set, a load that succeeds is allowed if ``harmless(objs, report)`` passes: the attack is
    then defeated by the load's result rather than by a refusal."""

    id: str
    file: str
    make: Callable[[Path], Any]
    match: str | None = None
    exc: type[Exception] | tuple[type[Exception], ...] = CheckpointError
    fresh: bool = False  # the live optimizer has no state yet (a resume into a new process)
    saved: str = "torch_adamw"
    live: str | None = None  # defaults to ``saved``
    at: str = "ckpt"  # where the checkpoint lies under the test's tmp_path
    load: Callable[..., Any] = load_state
    options: Callable[[Path], dict[str, Any]] = field(default=lambda folder: {})
    then: Callable[[Path], Any] | None = None
    harmless: Callable[[tuple, Any], Any] | None = None


def _plateau(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt)


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=100, cycle_momentum=False)


def save_checkpoint(kind: str, folder: Path) -> None:
    """Save the checkpoint of one kind: a trained torch AdamW with a cosine schedule and an accumulator mid-window
    (``torch_adamw``), the same with hf_optim's AdamW (``hf_adamw``) or split into files of 300 bytes
    (``sharded``), an AdamW with ReduceLROnPlateau (``plateau``) or OneCycleLR (``one_cycle``), an SGD alone
    (``sgd``)."""
    if kind in ("torch_adamw", "hf_adamw", "sharded"):
        _, opt, sched, acc = trained(factory="hf_adamw" if kind == "hf_adamw" else "torch_adamw")
        save_state(folder, opt, sched, acc, **({"max_shard_size": 300} if kind == "sharded" else {}))
    elif kind in ("plateau", "one_cycle"):
        _, opt, _, _ = trained()
        save_state(folder, opt, _plateau(opt) if kind == "plateau" else _one_cycle(opt))
    elif kind == "sgd":
        _, opt, _, _ = trained(factory="sgd_momentum")
        save_state(folder, opt)
    else:
        raise AssertionError(kind)


def live_objects(kind: str) -> tuple:
    """(model, optimizer, scheduler, accumulator) trained differently from the saved ones, of the saved kind
    (``fresh_accumulator``: a new GradientAccumulator, as a resuming process has)."""
    if kind == "hf_adamw":
        return trained(seed=9, steps=3, factory="hf_adamw")
    if kind in ("plateau", "one_cycle"):
        model, opt, _, _ = trained(seed=9, steps=3)
        return model, opt, _plateau(opt) if kind == "plateau" else _one_cycle(opt), None
    if kind == "sgd":
        model, opt, _, _ = trained(seed=9, steps=3)
        return model, opt, None, None
    model, opt, sched, acc = trained(seed=9, steps=3)
    if kind == "fresh_accumulator":
        acc = hf_optim.GradientAccumulator()
    return model, opt, sched, acc


def run_state_attack(attack: StateAttack, folder: Path) -> None:
    objs = live_objects(attack.live or attack.saved)
    _model, opt, sched, acc = objs
    if attack.fresh:
        opt.state.clear()
    before = live_snapshot(opt, sched, acc)
    try:
        report = attack.load(folder, opt, sched, acc, **attack.options(folder))
    except attack.exc as err:
        message = str(err)
        assert attack.file in message, f"{attack.file!r} not named in: {message}"
        assert attack.match is None or re.search(attack.match, message), f"{attack.match!r} not in: {message}"
        assert_live_unchanged(before, opt, sched, acc)
        if attack.then is not None:
            attack.then(folder)
        return
    assert attack.harmless is not None, f"the hostile checkpoint loaded: {report}"
    attack.harmless(objs, report)


# --- ways to edit a saved checkpoint ---------------------------------------------------------------------------


def edit_meta(path: Path, change: Callable[[dict], Any], change_tensors: Callable[[dict], Any] | None = None):
    """Apply ``change`` to the parsed hf_optim metadata of a safetensors file (and ``change_tensors`` to its
    tensors)."""

    def md(mdict):
        meta = json.loads(mdict["hf_optim"])
        change(meta)
        mdict["hf_optim"] = json.dumps(meta)

    rewrite_safetensors(path, md, change_tensors)


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def edit_scheduler(path: Path, change: Callable[[dict], Any]) -> None:
    """Apply ``change`` to the scheduler's saved ``__dict__`` in scheduler.json."""
    edit_json(path, lambda doc: change(doc["state_dict"]["dict"]))


def replace(path: Path, make: Callable[[Path], Any]) -> None:
    """Remove the file and let ``make`` put something else at its place."""
    os.remove(path)
    make(path)


def link_out_through_blobs(snapshot: Path, moved: str, *, to_root: bool = False) -> None:
    """``snapshot`` lies at ``<repo>/snapshots/<commit>``: make ``<repo>/blobs`` a symlink out of the folder and
    link ``moved`` into it, as a real cache snapshot links its files (``../../blobs/<name>``). ``blobs`` leads to
    a sibling folder ``outside`` holding the moved file, or (``to_root``) to ``/`` with the file linked to
    ``../../blobs/etc/passwd``."""
    repo = snapshot.parents[1]
    if to_root:
        os.remove(snapshot / moved)
        os.symlink("/", repo / "blobs")
        os.symlink("../../blobs/etc/passwd", snapshot / moved)
        assert os.path.realpath(snapshot / moved) == "/etc/passwd"
        return
    outside = repo.parents[1] / "outside"
    outside.mkdir()
    planted = outside / os.path.basename(moved)
    os.rename(snapshot / moved, planted)
    os.symlink(outside, repo / "blobs")
    os.symlink("../" * (moved.count("/") + 2) + f"blobs/{os.path.basename(moved)}", snapshot / moved)
    assert os.path.realpath(snapshot / moved) == str(planted)  # the link really leads outside the folder


def copy_checkpoint(source: Path, folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, folder, symlinks=True)
    return folder


def refuses(call: Callable[[Path], Any], file: str, match: str | None = None) -> Callable[[Path], None]:
    """A ``then`` check: ``call(folder)`` raises a CheckpointError naming ``file`` (and matching ``match``)."""

    def check(folder: Path) -> None:
        try:
            call(folder)
        except CheckpointError as err:
            assert file in str(err) and (match is None or re.search(match, str(err))), str(err)
        else:
            raise AssertionError(f"{call.__name__} accepted the hostile checkpoint")

    return check
