"""``optim_args`` strings typed for hf_optim optimizers (hf_optim.integrations.transformers.optim_args).

References: the optimizers' own signatures and the values written out."""

from __future__ import annotations

import pytest

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
