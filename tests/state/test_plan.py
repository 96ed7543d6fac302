"""The one check of a saved checkpoint against live objects (hf_optim.state.plan), as every layout uses it:
scheduler-owned group keys, named group differences, one summary line for strict=False, file modes."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.state.sharded._format import decode_value
from tests.state.helpers import live_snapshot


def _trained(model: torch.nn.Module, groups=None, steps: int = 2):
    opt = torch.optim.AdamW(groups or list(model.named_parameters()), lr=0.01)
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _model(layers: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(layers)))


def test_state_loads_before_the_scheduler_exists_like_torch(tmp_path):
    """Saved with a scheduler (its groups hold initial_lr), loaded into an optimizer whose scheduler is created
    afterwards: the keys the scheduler owns are restored as torch's load_state_dict restores them, and the
    scheduler built next resumes from them."""
    model = _model()
    opt = _trained(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    opt.step()
    sched.step()
    hf_optim.save_state(tmp_path, opt, sched)
    reference = torch.optim.AdamW(list(_model().named_parameters()), lr=0.01)
    reference.load_state_dict(opt.state_dict())  # torch's own behaviour: the oracle
    fresh = torch.optim.AdamW(list(_model().named_parameters()), lr=0.01)
    report = hf_optim.load_state(tmp_path, fresh)
    assert report.complete
    for mine, theirs in zip(fresh.param_groups, reference.param_groups, strict=True):
        assert mine["initial_lr"] == theirs["initial_lr"] == 0.01
        assert mine["lr"] == theirs["lr"]


@pytest.mark.parametrize("value", [float("nan"), "0.1", [0.1], float("inf")])
def test_scheduler_owned_group_key_must_be_a_finite_number(tmp_path, value):
    model = _model()
    opt = _trained(model)
    for group in opt.param_groups:
        group["initial_lr"] = value
    hf_optim.save_state(tmp_path, opt)
    fresh = torch.optim.AdamW(list(_model().named_parameters()), lr=0.01)
    before = live_snapshot(fresh)
    with pytest.raises(CheckpointError, match="initial_lr"):
        hf_optim.load_state(tmp_path, fresh)
    assert live_snapshot(fresh) == before


def test_a_different_number_of_groups_names_the_parameters(tmp_path):
    """Saved with layers 0-2 in three groups, loaded with layer 2 gone: the message names layer 2's parameters,
    not only the group counts."""
    model = _model(3)
    named = dict(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named.items() if n.startswith(f"{i}.")]} for i in range(3)]
    opt = _trained(model, groups)
    hf_optim.save_state(tmp_path, opt)
    small = _model(2)
    fewer = torch.optim.AdamW(
        [{"params": [(n, p) for n, p in small.named_parameters() if n.startswith(f"{i}.")]} for i in range(2)]
    )
    with pytest.raises(CheckpointError, match=r"3 parameter group\(s\), the optimizer 2 \(.*'2\.weight'"):
        hf_optim.load_state(tmp_path, fewer)


def test_strict_false_logs_one_summary_line(tmp_path, caplog):
    model = _model(3)
    opt = _trained(model)
    hf_optim.save_state(tmp_path, opt)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fresh = torch.optim.AdamW(list(other.named_parameters()), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="hf_optim"):
        report = hf_optim.load_state(tmp_path, fresh, strict=False)
    assert set(report.mismatched) == {"2.weight", "2.bias"} and len(report.notes) >= 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(note in warnings[0].getMessage() for note in report.notes)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    """Like torch.save / open(): a file's mode is 0666 minus the umask."""
    model = _model()
    opt = _trained(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = os.umask(umask)
    try:
        files = hf_optim.save_state(tmp_path / "ckpt", opt, sched, max_shard_size=200)
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(os.stat(tmp_path / "reference.pt").st_mode)
    assert expected == 0o666 & ~umask
    assert len(files) > 2  # shards, index and scheduler file
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path


@pytest.mark.parametrize(
    "node",
    [
        {"scalar": 1e30, "dtype": "int64"},
        {"scalar": -(2**70), "dtype": "int64"},
        {"scalar": 1e300, "dtype": "int32"},
    ],
)
def test_a_scalar_that_does_not_fit_its_dtype_names_where(node):
    with pytest.raises(CheckpointError, match=r"optimizer\.sharded\.json: state\['0\.weight'\]\['step'\]"):
        decode_value(node, "optimizer.sharded.json: state['0.weight']['step']")
