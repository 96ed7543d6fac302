"""Pickled BertAdam / OpenAIAdam state_dicts written by the real pytorch-pretrained-bert, read without it.

A subprocess imports the verbatim legacy modules under their real package name (``pytorch_pretrained_bert``,
from tests/legacy/oracles), trains, pickles ``optimizer.state_dict()`` with ``torch.save`` and keeps training;
this process, where that package cannot be imported, loads the pickle into hf_optim's optimizer and must
continue to exactly the same parameters.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_optim
from hf_optim.errors import CheckpointError
from hf_optim.legacy import load_pickled_legacy_state_dict
from hf_optim.legacy import pytorch_pretrained_bert as ours

ORACLES = Path(__file__).parent / "oracles"

WRITER = r"""
import sys, warnings
import torch
warnings.simplefilter("ignore")
from pytorch_pretrained_bert.optimization import BertAdam, WarmupCosineWithWarmupRestartsSchedule
from pytorch_pretrained_bert.optimization_openai import OpenAIAdam

out = sys.argv[1]
SHAPES = [(6, 4), (4,), (3, 2, 2)]


def stream(params, steps, g):
    for _ in range(steps):
        yield [torch.randn(p.shape, generator=g) * 3.0 for p in params]


for kind in ("bert", "openai"):
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(SHAPES)]
    restarts = WarmupCosineWithWarmupRestartsSchedule(warmup=0.1, t_total=12, cycles=2)
    if kind == "bert":
        opt = BertAdam([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "schedule": restarts}],
                       lr=1e-2, warmup=0.1, t_total=8)
    else:
        opt = OpenAIAdam([{"params": params[:2]}, {"params": params[2:], "schedule": restarts}],
                         lr=1e-2, warmup=0.1, t_total=8, weight_decay=0.01, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(7)
    for step, grads in enumerate(stream(params, 12, g)):
        if step == 6:  # the checkpoint, past nothing yet; then past t_total=8 (warnings, lr 0)
            torch.save(opt.state_dict(), f"{out}/{kind}_optimizer.pt")
            torch.save([p.detach().clone() for p in params], f"{out}/{kind}_params6.pt")
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    torch.save([p.detach().clone() for p in params], f"{out}/{kind}_params12.pt")

torch.save(opt, f"{out}/whole_optimizer.pt")  # pickles the OpenAIAdam class itself: must be refused
tampered = opt.state_dict()
tampered["param_groups"][0]["schedule"].evil = "payload"
torch.save(tampered, f"{out}/tampered.pt")
"""


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("legacy_pickles")
    env = {**os.environ, "PYTHONPATH": str(ORACLES)}
    subprocess.run([sys.executable, "-c", WRITER, str(out)], check=True, env=env, timeout=240)
    return out


def _continue_to_step_12(opt, params, expected_file):
    """Steps 6..11 with the legacy writer's gradient stream; the parameters must equal the legacy run's."""
    g = torch.Generator().manual_seed(7)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=g) * 3.0 for p in params]
        if step >= 6:
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            opt.step()
    expected = torch.load(expected_file, weights_only=True)
    for e, p in zip(expected, params, strict=True):
        assert torch.equal(e, p.detach())


def test_the_legacy_package_is_not_importable_here():
    assert importlib.util.find_spec("pytorch_pretrained_bert") is None


@pytest.mark.parametrize(("kind", "cls"), [("bert", hf_optim.BertAdam), ("openai", hf_optim.OpenAIAdam)])
def test_converted_state_continues_exactly(legacy_files, kind, cls):
    state_dict = load_pickled_legacy_state_dict(legacy_files / f"{kind}_optimizer.pt")
    schedules = [group["schedule"] for group in state_dict["param_groups"]]
    assert [type(s) for s in schedules] == [
        ours.WarmupLinearSchedule,
        ours.WarmupCosineWithWarmupRestartsSchedule,
    ]
    assert schedules[1].cycles == 2 and schedules[1].warmup == pytest.approx(0.2)

    params = [p.requires_grad_() for p in torch.load(legacy_files / f"{kind}_params6.pt", weights_only=True)]
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], lr=1.0, foreach=False, fused=False)
    opt.load_state_dict(state_dict)
    _continue_to_step_12(opt, params, legacy_files / f"{kind}_params12.pt")


def test_other_classes_are_refused_by_name(legacy_files):
    with pytest.raises(
        CheckpointError,
        match=r"whole_optimizer\.pt.*pytorch_pretrained_bert\.optimization_openai\.OpenAIAdam",
    ):
        load_pickled_legacy_state_dict(legacy_files / "whole_optimizer.pt")


_SIDE_EFFECTS: list[str] = []


def _record(what: str) -> None:
    _SIDE_EFFECTS.append(what)


class _Payload:
    def __reduce__(self):
        return (_record, ("ran",))


def test_a_callable_in_the_pickle_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [{"params": [0], "schedule": _Payload()}]}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*tests\.legacy\.test_checkpoints\._record"):
        load_pickled_legacy_state_dict(path)
    assert _SIDE_EFFECTS == []


def test_unexpected_schedule_fields_are_refused(legacy_files):
    with pytest.raises(CheckpointError, match=r"tampered\.pt.*schedule"):
        load_pickled_legacy_state_dict(legacy_files / "tampered.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.pt"):
        load_pickled_legacy_state_dict(tmp_path / "nothing.pt")


def test_not_an_optimizer_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match="param_groups"):
        load_pickled_legacy_state_dict(path)


@pytest.mark.parametrize(("kind", "cls"), [("bert", hf_optim.BertAdam), ("openai", hf_optim.OpenAIAdam)])
def test_hf_optim_convert_then_load_state_continues_exactly(legacy_files, tmp_path, kind, cls):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "optimizer.pt").write_bytes((legacy_files / f"{kind}_optimizer.pt").read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "convert", str(checkpoint)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (checkpoint / "optimizer.safetensors").is_file()
    info = hf_optim.inspect_state(checkpoint)
    assert info.optimizer_class == f"{cls.__module__}.{cls.__qualname__}"

    params = [p.requires_grad_() for p in torch.load(legacy_files / f"{kind}_params6.pt", weights_only=True)]
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], lr=1.0, foreach=False, fused=False)
    hf_optim.load_state(checkpoint, opt)  # by position: the legacy file has no parameter names
    _continue_to_step_12(opt, params, legacy_files / f"{kind}_params12.pt")
