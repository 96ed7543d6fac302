"""Enum members added to transformers' ``OptimizerNames`` at run time (hf_optim.integrations.transformers.enums).

References: transformers' own enum, parser and Trainer behaviour."""

from __future__ import annotations

import pickle
import uuid
from enum import Enum

import pytest
import torch

import hf_optim
from hf_optim.errors import TransformersIntegrationError
from hf_optim.integrations.transformers import enums

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    HfArgumentParser,
    TrainingArguments,
)
from transformers import Trainer as HFTrainer  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

from tests.integrations.transformers_helpers import (  # noqa: E402
    tiny_bert,
    training_args,
)


def test_names_with_the_same_member_name_all_parse(tmp_path):
    """``x_hf``, ``x-hf`` and ``x.hf`` map to one identifier: each gets its own member and parses as itself."""
    stem = f"t{uuid.uuid4().hex[:8]}"
    values = [f"{stem}_hf", f"{stem}-hf", f"{stem}.hf"]
    for value in values:
        hf_optim.register_optimizer(value, torch.optim.SGD)
    choices = next(a for a in HfArgumentParser(TrainingArguments)._actions if a.dest == "optim").choices
    assert len(choices) == len(set(choices)) == len(OptimizerNames)
    for value in values:
        assert OptimizerNames(value).value == value
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", value, "--report_to", "none", "--use_cpu"]
        )
        assert args.optim is OptimizerNames(value)
        assert training_args(tmp_path, optim=value).optim.value == value
        assert pickle.loads(pickle.dumps(args.optim)) is args.optim
        assert type(HFTrainer(model=tiny_bert(), args=args).create_optimizer()) is torch.optim.SGD


class _NoIteration(type(OptimizerNames)):
    """An enum metaclass that lists no members: a member added at run time never shows up."""

    def __iter__(cls):
        return iter(())


def test_failed_enum_member_is_rolled_back():
    class broken(str, Enum, metaclass=_NoIteration):
        KEPT = "kept"

    with pytest.raises(TransformersIntegrationError, match="'new-value'"):
        enums.add_enum_member(broken, "new-value")
    # Nothing of the attempt is left: no class attribute, member or value.
    assert "NEW_VALUE" not in vars(broken)
    assert set(broken.__members__) == {"KEPT"}
    assert set(broken._value2member_map_) == {"kept"}
    assert broken._member_names_ == ["KEPT"]
