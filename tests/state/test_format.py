"""Constants and parsing of the format: max_shard_size, the hardened JSON parser."""

from __future__ import annotations

import pytest

from hf_optim import (
    save_state,
)
from hf_optim.state import parse_max_shard_size
from tests.state.helpers import (
    OPTIMIZERS,
    make_setup,
)


@pytest.mark.parametrize("bad", [0, -5, "5XB", "GB", True, 1.5])
def test_max_shard_size_is_validated(tmp_path, bad):
    _model, opt, _ = make_setup(OPTIMIZERS["torch_adamw"])
    with pytest.raises(ValueError, match="max_shard_size"):
        save_state(tmp_path, opt, max_shard_size=bad)


def test_max_shard_size_units():
    assert parse_max_shard_size("5GB") == 5 * 10**9
    assert parse_max_shard_size("500MB") == 500 * 10**6
    assert parse_max_shard_size("2GiB") == 2 * 2**30
    assert parse_max_shard_size("1.5kb") == 1500
    assert parse_max_shard_size(1234) == 1234
