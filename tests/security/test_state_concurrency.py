"""Concurrent saves and loads: one save at a time per folder (the lock), and a load that meets a save gets one
whole checkpoint or a CheckpointError saying the checkpoint changed, never a mix or a raw OSError.

Reference for "no mix": every save writes state whose values all encode the save's number (tensors filled with
it, the scheduler's last_epoch equal to it), so a loaded checkpoint is whole iff all values agree.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import hf_optim
import hf_optim.state.reader as reader
from hf_optim import OPTIMIZER_INDEX_NAME, SCHEDULER_NAME, CheckpointError, load_state, save_state
from hf_optim.state import LOCK_NAME
from tests.state.helpers import trained


def test_second_concurrent_save_fails_at_once(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path, opt, sched, acc)
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a save in progress holds
        with pytest.raises(RuntimeError, match=f"another process is saving into .*{LOCK_NAME}"):
            save_state(tmp_path, opt, sched, acc)
    finally:
        os.close(fd)
    save_state(tmp_path, opt, sched, acc)  # the lock is free again
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    _, opt, sched, acc = trained()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match="another process is saving"):
            save_state(tmp_path, opt, sched, acc)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the killed process
    save_state(tmp_path, opt, sched, acc)
    assert hf_optim.has_state(tmp_path)


WRITER = textwrap.dedent(
    """
    import sys, torch, hf_optim
    sys.path.insert(0, {root!r})
    from tests.state.helpers import trained
    _, opt, sched, acc = trained()
    directory, shard_size = {directory!r}, {shard_size!r}
    n = 0
    while True:
        n += 1
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.fill_(n)
        sched.last_epoch = n
        acc_state = acc.state_dict()
        acc_state["gradients"] = [None if g is None else torch.full_like(g, n) for g in acc_state["gradients"]]
        acc.load_state_dict(acc_state)
        hf_optim.save_state(directory, opt, sched, acc, max_shard_size=shard_size)
        if n == 1:
            print("ready", flush=True)
    """
)


def _save_number(opt, sched, acc) -> int:
    values = {int(sched.last_epoch)}
    for state in opt.state.values():
        for value in state.values():
            values.update(int(v) for v in value.reshape(-1).unique().tolist())
    for g in acc.state_dict()["gradients"]:
        if g is not None:
            values.update(int(v) for v in g.reshape(-1).unique().tolist())
    assert len(values) == 1, f"a mix of saves {sorted(values)}"
    return values.pop()


@pytest.mark.parametrize("shard_size", ["5GB", 300], ids=["single", "sharded"])
def test_loads_racing_a_writer_get_whole_checkpoints(tmp_path, shard_size):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = WRITER.format(root=root, directory=str(tmp_path), shard_size=shard_size)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    loaded = changed = 0
    numbers = set()
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)  # each load replaces all of their state
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while loaded + changed < 300 and time.monotonic() < deadline:
            try:
                load_state(tmp_path, opt2, sched2, acc2)
            except CheckpointError as err:
                assert "changed while loading" in str(err), str(err)
                changed += 1
                continue
            numbers.add(_save_number(opt2, sched2, acc2))
            loaded += 1
    finally:
        writer.kill()
        writer.wait(timeout=30)
    print(f"{loaded} whole loads, {changed} 'changed while loading', saves seen: {len(numbers)}")
    assert loaded >= 50, (loaded, changed)
    assert len(numbers) >= 2  # the loads really overlapped different saves
    assert SCHEDULER_NAME in os.listdir(tmp_path)


# A load meeting a concurrent save at a chosen moment: the save runs from inside hf_optim's own reader when the
# window is open (a wrapper around hf_optim.state.reader's file opening; no third-party code is patched).


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
