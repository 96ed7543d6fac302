"""``optim_args`` strings typed for hf_optim optimizers (hf_optim.integrations.transformers.optim_args).

References: the optimizers' own signatures and the values written out."""

from __future__ import annotations

import inspect

import pytest

import hf_optim
from hf_optim.integrations.transformers.optim_args import convert_optim_arg, parse_optim_args

transformers = pytest.importorskip("transformers")
from transformers import Trainer as HFTrainer  # noqa: E402

from tests.integrations.transformers_helpers import (  # noqa: E402
    tiny_bert,
    training_args,
)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("correct_bias=maybe", "correct_bias='maybe'"),
        ("nonexistent=1", "'nonexistent' is not an argument of optimizer 'adamw_hf'"),
        ("foreach=sometimes", "foreach='sometimes'"),
    ],
)
def test_bad_optim_args_name_the_argument(tmp_path, optim_args, message):
    args = training_args(tmp_path, optim="adamw_hf", optim_args=optim_args)
    with pytest.raises(ValueError, match="optim_args") as info:
        HFTrainer(model=tiny_bert(), args=args).create_optimizer()
    assert message in str(info.value)


def test_values_are_typed_by_the_optimizers_own_parameters():
    info = hf_optim.get_optimizer_info("adam_weight_decay")
    parsed = parse_optim_args(
        {
            "amsgrad": "true",
            "betas": "0.8:0.95",
            "epsilon": "1e-7",
            "lr": "0.002",
            "exclude_from_weight_decay": "a;b",
        },
        info,
    )
    # written out: AdamWeightDecay's own names, with the types its signature declares
    assert parsed == {
        "amsgrad": True,
        "beta_1": 0.8,
        "beta_2": 0.95,
        "epsilon": 1e-7,
        "learning_rate": 0.002,
        "exclude_from_weight_decay": ["a", "b"],
    }
    adamw = parse_optim_args(
        {"correct_bias": "no", "betas": "0.7:0.8"}, hf_optim.get_optimizer_info("adamw_hf")
    )
    assert adamw == {"correct_bias": False, "betas": (0.7, 0.8)}


def test_convert_optim_arg_by_annotation_and_default():
    def f(
        params,
        flag: bool = True,
        rate: float = 0.1,
        count: int = 3,
        betas: tuple[float, float] = (0.9, 0.99),
        names: list[str] | None = None,
        mode: str = "a",
        other=None,
    ):
        pass

    params = inspect.signature(f).parameters
    assert convert_optim_arg("yes", params["flag"]) is True
    assert convert_optim_arg("0.5", params["rate"]) == 0.5
    assert convert_optim_arg("7", params["count"]) == 7
    assert convert_optim_arg("0.8:0.9", params["betas"]) == (0.8, 0.9)
    assert convert_optim_arg("a;b", params["names"]) == ["a", "b"]
    assert convert_optim_arg("none", params["names"]) is None
    assert convert_optim_arg("x", params["mode"]) == "x"
    assert convert_optim_arg("12", params["other"]) == 12
    assert convert_optim_arg("true", None) is True
    with pytest.raises(ValueError, match="boolean"):
        convert_optim_arg("maybe", params["flag"])
    with pytest.raises(ValueError, match="integer"):
        convert_optim_arg("1.5", params["count"])
