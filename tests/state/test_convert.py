"""What ``convert_checkpoint`` infers, against the state dicts of the real optimizer classes."""

from __future__ import annotations

import json

import pytest
import torch

import hf_optim
from hf_optim.state.convert import infer_optimizer_class


def _state_dict(opt_cls, **kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    opt = opt_cls([p], **kwargs)
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _state_dict(torch.optim.AdamW, lr=0.1), "torch.optim.adamw.AdamW"),
        (lambda: _state_dict(torch.optim.Adam, lr=0.1), "torch.optim.adam.Adam"),
        (lambda: _state_dict(hf_optim.AdamW, lr=0.1), "hf_optim.optimizers.adamw.AdamW"),
        (lambda: _state_dict(torch.optim.SGD, lr=0.1, momentum=0.9), "torch.optim.sgd.SGD"),
    ],
    ids=["torch-adamw", "torch-adam", "hf-adamw", "sgd"],
)
def test_infer_optimizer_class(make, expected):
    sd = make()
    cls, reason = infer_optimizer_class(sd)
    assert cls == expected, reason


def test_unknown_class_says_why():
    sd = _state_dict(torch.optim.Adagrad, lr=0.1)
    cls, reason = infer_optimizer_class(sd)
    assert cls is None and reason


def _deepspeed_folder(tmp_path):
    from tests.security import deepspeed_files

    deepspeed_files.write_checkpoint(tmp_path)
    return tmp_path, deepspeed_files.TAG


def test_a_deepspeed_checkpoint_is_found_by_its_latest_file_its_tag_or_its_own_folder(tmp_path):
    """``convert_checkpoint`` finds DeepSpeed's files as DeepSpeed's ``load_checkpoint`` does: the tag ``latest``
    names, or the one given; several ``global_step*`` folders and no ``latest`` is an error naming them."""
    import shutil

    from hf_optim.errors import CheckpointError
    from hf_optim.state.convert import convert_checkpoint

    folder, tag = _deepspeed_folder(tmp_path / "run")
    shutil.copytree(folder / tag, folder / "global_step4")
    assert convert_checkpoint(str(folder), output=str(tmp_path / "a"))[0].endswith("optimizer.sharded.json")
    (folder / "latest").unlink()
    with pytest.raises(CheckpointError, match="global_step2, global_step4"):
        convert_checkpoint(str(folder), output=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
    assert convert_checkpoint(str(folder), output=str(tmp_path / "b"), tag="global_step4")
    assert convert_checkpoint(str(folder / tag), output=str(tmp_path / "c"))
    infos = [
        json.loads((tmp_path / out / "optimizer.sharded.json").read_text())["info"]["source"] for out in "abc"
    ]
    assert [s.split()[-4] for s in infos] == ["global_step2", "global_step4", "global_step2"]
