"""Hostile folders and manifests for sharded state: links out of the folder, overlapping chunks.

* A local folder laid out like a Hugging Face cache snapshot (``models--x/snapshots/<commit>/``) whose ``blobs``
  is itself a symlink out of the folder: every file must still resolve inside the checkpoint (reference: where
  the file really lies, ``os.path.realpath``, and the bytes of a file planted outside).
* A small manifest whose chunks all share the first rows, so that the overlap sweep keeps every chunk active.

Every hostile input must give a ``CheckpointError`` and leave the live objects as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim import CheckpointError
from hf_optim.state.sharded import SHARDED_MANIFEST_NAME, inspect_sharded_state, save_sharded_state
from tests.state.helpers import assert_live_unchanged, live_snapshot
from tests.state.sharded_jobs import make_run

ROOT = str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------------------------
# A folder shaped like a cache snapshot, whose blobs/ leads out of it
# ---------------------------------------------------------------------------------------------------------------


def _fake_snapshot(tmp_path: Path, source: Path, moved: str) -> tuple[Path, Path]:
    """Copy the checkpoint ``source`` to ``evil/models--x/snapshots/abc``, move ``moved`` (a file of it) to a
    folder outside ``evil`` and make ``evil/models--x/blobs`` a symlink to that folder; the snapshot's file links
    to ``../../blobs/<name>``, as in a real cache. Returns the snapshot and the planted file."""
    repo = tmp_path / "evil" / "models--x"
    snapshot = repo / "snapshots" / "abc"
    shutil.copytree(source, snapshot)
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = outside / os.path.basename(moved)
    os.rename(snapshot / moved, planted)
    os.symlink(outside, repo / "blobs")
    depth = moved.count("/")
    os.symlink("../" * (depth + 2) + f"blobs/{os.path.basename(moved)}", snapshot / moved)
    assert os.path.realpath(snapshot / moved) == str(planted)  # the link really leads outside the folder
    assert not str(planted).startswith(str(tmp_path / "evil"))
    return snapshot, planted


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded (v2) checkpoint saved by one process with a plain model (tests copy it)."""
    model, opt, sched = make_run(1, None)
    torch.manual_seed(0)
    for _ in range(2):
        loss = model(torch.randn(4, model[0].in_features)).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    folder = tmp_path_factory.mktemp("links") / "v2"
    save_sharded_state(folder, opt, sched, model=model)
    return folder


def _first_shard(folder: Path) -> str:
    doc = json.loads((folder / SHARDED_MANIFEST_NAME).read_text())
    return f"{doc['shards']['folder']}/{doc['shards']['files'][0]}"


def _inspect(snapshot: Path, tmp_path: Path) -> None:
    inspect_sharded_state(snapshot)


def _load(snapshot: Path, tmp_path: Path) -> None:
    model, opt, sched = make_run(1, None)
    before = live_snapshot(model, opt, sched)
    try:
        hf_optim.load_state(snapshot, opt, sched, model=model)
    except CheckpointError:
        assert_live_unchanged(before, model, opt, sched)
        raise


def _consolidate(snapshot: Path, tmp_path: Path) -> None:
    try:
        hf_optim.consolidate_state(snapshot, tmp_path / "out")
    except CheckpointError:
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing written
        raise


# id -> (the file reached through blobs: the manifest or a shard, the entry point that reads it)
BLOBS_ATTACKS = {
    "inspect-manifest": (False, _inspect),
    "load-shard": (True, _load),
    "consolidate-shard": (True, _consolidate),
}


@pytest.mark.parametrize(("shard", "entry"), BLOBS_ATTACKS.values(), ids=BLOBS_ATTACKS.keys())
def test_a_file_reached_through_a_symlinked_blobs_is_refused(sharded, tmp_path, shard, entry):
    snapshot, _ = _fake_snapshot(tmp_path, sharded, _first_shard(sharded) if shard else SHARDED_MANIFEST_NAME)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        entry(snapshot, tmp_path)


def test_a_real_cache_layout_still_loads(sharded, tmp_path):
    """Control: ``blobs`` a real directory of the repository, the snapshot's files links into it (refs/ absent,
    as for a download pinned to a commit) loads."""
    repo = tmp_path / "cache" / "models--x"
    snapshot = repo / "snapshots" / "abc"
    shutil.copytree(sharded, snapshot)
    (repo / "blobs").mkdir()
    moved = _first_shard(sharded)
    os.rename(snapshot / moved, repo / "blobs" / "deadbeef")
    os.symlink("../../../blobs/deadbeef", snapshot / moved)
    info = inspect_sharded_state(snapshot)
    assert info.num_shards >= 1


# ---------------------------------------------------------------------------------------------------------------
# The overlap sweep on chunks that all share the first rows
# ---------------------------------------------------------------------------------------------------------------


def test_chunks_sharing_their_rows_end_quickly(sharded, tmp_path):
    """A ``[1, 8000]`` tensor tiled exactly by 8,000 one-element chunks in 8,000 listed files (a manifest of about
    1 MB): the sweep along the first dimension never drops a chunk (they all lie in row 0), so the overlap check
    compares 32 million pairs. The manifest must be refused (the shard files are absent) well before the deadline;
    a process still busy after it fails the test."""
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    path = bad / SHARDED_MANIFEST_NAME
    doc = json.loads(path.read_text())
    n = 8_000
    files = [f"shard-{i:05d}-model-00009-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    doc["shards"]["files"] += files  # the other tensors keep their real chunks and files
    name = next(iter(doc["state"]))
    entry = doc["state"][name]["exp_avg"]
    entry["shape"] = [1, n]  # inspect checks no model: any shape is a valid tensor of the manifest
    entry["chunks"] = [{"file": files[i], "offsets": [0, i], "sizes": [1, 1]} for i in range(n)]
    path.write_text(json.dumps(doc))
    assert path.stat().st_size < 2_000_000
    code = (
        "import sys\n"
        "from hf_optim.errors import CheckpointError\n"
        "from hf_optim.state.sharded import inspect_sharded_state\n"
        "try:\n"
        "    inspect_sharded_state(sys.argv[1])\n"
        "    print('loaded')\n"
        "except CheckpointError as exc:\n"
        "    print('refused:', str(exc)[:200])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(bad)],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            "a 1 MB manifest of 8,000 one-element chunks kept inspect_sharded_state busy for over 20 s"
        )
    assert re.match(r"refused: .*(missing|shard)", done.stdout), done.stdout + done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Processes whose copies of the checkpoint are different saves (node-local storage, a stale copy on one machine)
# ---------------------------------------------------------------------------------------------------------------
