"""Adversarial review: a load meeting a concurrent save must get one whole checkpoint or a CheckpointError
saying the checkpoint changed while loading (docs/FORMAT.md "Loading"), never a raw FileNotFoundError.

The race is made deterministic by running the concurrent save from inside hf_optim's own reader at the moment
the window is open (a wrapper around hf_optim.state.reader's file opening; no third-party code is patched)."""

from __future__ import annotations

import pytest

import hf_optim.state.reader as reader
from hf_optim import OPTIMIZER_INDEX_NAME, SCHEDULER_NAME, CheckpointError, load_state, save_state
from tests.state.helpers import trained


def test_index_retired_by_a_concurrent_save(tmp_path, monkeypatch):
    """Sharded checkpoint A in place; a save of a single-file checkpoint B runs between the reader's
    ``lexists(index)`` and its ``open_file(index)`` (B's commit retires the index)."""
    _, opt, sched, acc = trained()
    save_state(tmp_path, opt, sched, acc, max_shard_size=300)
    fired = []
    real = reader.open_file

    def racing(path, *, roots):
        if not fired and str(path).endswith(OPTIMIZER_INDEX_NAME):
            fired.append(1)
            save_state(tmp_path, opt, sched, acc)
        return real(path, roots=roots)

    monkeypatch.setattr(reader, "open_file", racing)
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)
    try:
        load_state(tmp_path, opt2, sched2, acc2)  # B, whole
    except CheckpointError as err:
        assert "changed while loading" in str(err), str(err)
    assert fired


@pytest.mark.parametrize("case", ["shards-deleted", "scheduler-dropped"])
def test_member_deleted_by_a_concurrent_save(tmp_path, monkeypatch, case):
    """A's manifest is open; before the reader opens a member file (a shard / scheduler.json), a save of B
    completes and deletes the files only A used (A sharded -> B single; A with a scheduler -> B without)."""
    _, opt, sched, acc = trained()
    if case == "shards-deleted":
        save_state(tmp_path, opt, sched, acc, max_shard_size=300)
        trigger, second = "optimizer-", {"scheduler": sched, "accumulator": acc}
    else:
        save_state(tmp_path, opt, sched, acc)
        trigger, second = SCHEDULER_NAME, {"accumulator": acc}
    fired = []
    real = reader._open_member

    def racing(directory, name, *args, **kwargs):
        if not fired and name.startswith(trigger):
            fired.append(1)
            save_state(tmp_path, opt, **second)
        return real(directory, name, *args, **kwargs)

    monkeypatch.setattr(reader, "_open_member", racing)
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)
    try:
        load_state(tmp_path, opt2, sched2 if case == "shards-deleted" else None, acc2)
    except CheckpointError as err:
        assert "changed while loading" in str(err), str(err)
    assert fired
