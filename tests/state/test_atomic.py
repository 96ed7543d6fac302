"""Atomic saves: interrupted at every rename, the directory loads the old or the new checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

import hf_optim
from hf_optim import (
    load_state,
    save_state,
)
from hf_optim.state import atomic
from tests.state.helpers import (
    assert_same_value,
    batches,
    big_setup,
    snapshot,
    train,
)


@pytest.mark.parametrize(
    ("old_shard", "new_shard"), [("5GB", "5GB"), ("5GB", 2500), (2500, 2500), (1500, 4000), (2500, "5GB")]
)
def test_save_interrupted_at_each_rename_leaves_a_loadable_checkpoint(
    tmp_path, monkeypatch, old_shard, new_shard
):
    real_replace = os.replace
    k = 0
    while True:
        directory = tmp_path / f"run{k}"
        model, opt, sched = big_setup()
        acc = hf_optim.GradientAccumulator()
        acc([p.detach().clone() for p in model.parameters()])
        save_state(directory, opt, sched, acc, max_shard_size=old_shard)
        old = snapshot(opt, sched, acc)
        train(model, opt, sched, batches(10, 1))
        acc([p.detach().clone() for p in model.parameters()])
        new = snapshot(opt, sched, acc)

        calls = 0

        def interrupted(src, dst, _k=k):
            nonlocal calls
            if calls == _k:
                raise KeyboardInterrupt("simulated kill")
            calls += 1
            return real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", interrupted)
        try:
            save_state(directory, opt, sched, acc, max_shard_size=new_shard)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(atomic.os, "replace", real_replace)

        _, opt2, sched2 = big_setup()
        acc2 = hf_optim.GradientAccumulator()
        load_state(directory, opt2, sched2, acc2)
        got = snapshot(opt2, sched2, acc2)
        if finished:
            assert _equal_state(got, new)
            assert not [n for n in os.listdir(directory) if n.startswith(".")]
            break
        assert _equal_state(got, old) or _equal_state(got, new), f"interrupted after {k} renames: mixed state"
        k += 1
    assert k >= 3


def _equal_state(a, b) -> bool:
    try:
        assert_same_value(a, b)
        return True
    except AssertionError:
        return False


def test_an_object_file_written_while_a_checkpoint_commits_in_the_same_folder(tmp_path, monkeypatch):
    """Under Accelerate every process writes its random states beside the checkpoint the main process commits
    into the same folder; the commit clears leftover staging folders, which must not be a live object save's."""
    import hf_optim.state.save as save_module
    from hf_optim.state import atomic, load_object_state, save_object_state

    write = save_module.write_safetensors

    def commit_meanwhile(path, *args, **kwargs):  # another process's commit, between staging and writing
        atomic.remove_leftovers(str(tmp_path))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(save_module, "write_safetensors", commit_meanwhile)
    save_object_state(tmp_path / "random_states_1.safetensors", {"seed": torch.arange(3)}, kind="rng")
    assert torch.equal(
        load_object_state(tmp_path / "random_states_1.safetensors", kind="rng")["seed"], torch.arange(3)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random_states_1.safetensors"]
