"""Hostile files in a checkpoint folder: FIFOs, devices, directories and escaping symlinks where a file is
expected; hostile JSON (duplicate keys, deep nesting, huge numbers). Each is refused before anything changes,
with a CheckpointError naming the file, and never hangs or raises a RecursionError / raw OSError."""

from __future__ import annotations

import json
import os
import struct

import pytest

from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    has_state,
    inspect_state,
    load_state,
    save_state,
    state,
)
from tests.state.helpers import assert_refused, rewrite_safetensors, trained


@pytest.fixture
def saved(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"


@pytest.fixture
def sharded(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path / "sharded", opt, sched, acc, max_shard_size=300)
    assert (tmp_path / "sharded" / OPTIMIZER_INDEX_NAME).exists()
    return tmp_path / "sharded"


@pytest.mark.parametrize("name", [SCHEDULER_NAME, ACCUMULATOR_NAME, OPTIMIZER_NAME])
def test_fifo_is_refused_without_hanging(saved, name):
    os.remove(saved / name)
    os.mkfifo(saved / name)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, name, "not a regular file")
    assert not has_state(saved)


@pytest.mark.parametrize("name", [SCHEDULER_NAME, OPTIMIZER_NAME])
def test_directory_is_refused(saved, name):
    os.remove(saved / name)
    os.mkdir(saved / name)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, name, "not a regular file")


def test_device_inside_the_folder_is_refused(saved, tmp_path):
    # a device node cannot be created without privileges: a symlink to /dev/zero escapes the folder anyway,
    # so check both the escape and (through a bind of the device's path as root) the S_ISREG test
    os.remove(saved / SCHEDULER_NAME)
    os.symlink("/dev/zero", saved / SCHEDULER_NAME)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, "outside the checkpoint")
    _, opt, sched, acc = trained(seed=9, steps=3)
    with pytest.raises(CheckpointError, match=f"{SCHEDULER_NAME} is not a regular file"):
        state.load_state(saved, opt, sched, acc, roots=[str(saved), "/dev"])


def test_symlink_escaping_the_folder_is_refused(saved, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((saved / SCHEDULER_NAME).read_text())  # a valid file: only its place is wrong
    os.remove(saved / SCHEDULER_NAME)
    os.symlink(outside, saved / SCHEDULER_NAME)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, "outside the checkpoint")


def test_symlink_inside_the_folder_is_followed(saved):
    os.rename(saved / SCHEDULER_NAME, saved / "real.json")
    os.symlink("real.json", saved / SCHEDULER_NAME)
    _, opt, sched, acc = trained(seed=9, steps=3)
    assert load_state(saved, opt, sched, acc).scheduler_loaded


def _set_index_metadata(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_duplicate_json_keys_are_refused(saved):
    path = saved / SCHEDULER_NAME
    text = path.read_text()
    path.write_text(text.replace('"format":', '"format": "x", "format":', 1))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, "duplicate key 'format'")


def test_duplicate_keys_in_safetensors_metadata_are_refused(saved):
    def dup(md):
        md["hf_optim"] = md["hf_optim"].replace('"keyed_by":', '"keyed_by": "index", "keyed_by":', 1)

    rewrite_safetensors(saved / OPTIMIZER_NAME, dup)
    assert_refused(
        saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, "duplicate key 'keyed_by'"
    )


def test_huge_numbers_are_a_checkpoint_error(saved):
    path = saved / SCHEDULER_NAME
    doc = json.loads(path.read_text())
    doc["state_dict"]["dict"]["last_epoch"] = 0
    text = json.dumps(doc).replace('"last_epoch": 0', '"last_epoch": ' + "9" * 5000)
    path.write_text(text)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME, "digits|integer")
    with pytest.raises(CheckpointError, match=SCHEDULER_NAME):
        inspect_state(saved)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_nesting_is_a_checkpoint_error(sharded, depth):
    path = sharded / OPTIMIZER_INDEX_NAME
    _set_index_metadata(path, lambda doc: doc["metadata"]["hf_optim"]["extra"].update(deep=0))
    deep = "[" * depth + "]" * depth
    path.write_text(path.read_text().replace('"deep": 0', '"deep": ' + deep))
    assert_refused(
        sharded, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_INDEX_NAME, "nested too deeply"
    )
    assert not has_state(sharded)


def test_save_over_a_hostile_checkpoint_overwrites_it(sharded):
    """Existing files with JSON nested 100k deep are not a checkpoint to preserve: the save replaces them."""
    deep = "[" * 100_000 + "]" * 100_000
    (sharded / OPTIMIZER_INDEX_NAME).write_text('{"metadata": ' + deep + ', "weight_map": {}}')
    (sharded / SCHEDULER_NAME).write_text(deep)
    _, opt, sched, acc = trained(seed=10, steps=2)
    save_state(sharded, opt, sched, acc)
    assert has_state(sharded)
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)
    assert load_state(sharded, opt2, sched2, acc2).complete


def test_safetensors_header_that_lies_about_its_size(saved):
    path = saved / ACCUMULATOR_NAME
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 4)
    path.write_bytes(bytes(raw))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, ACCUMULATOR_NAME)
