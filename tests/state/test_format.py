"""Constants and parsing of the format: max_shard_size, the hardened JSON parser."""

from __future__ import annotations

import pytest

from hf_optim import (
    CheckpointError,
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


def test_parse_json_refuses_what_json_allows():
    from hf_optim.state.format import MAX_JSON_DEPTH, parse_json

    assert parse_json(b'{"a": [1, 2.5, null]}', "f") == {"a": [1, 2.5, None]}
    with pytest.raises(CheckpointError, match="f is truncated or corrupted: duplicate key 'a'"):
        parse_json('{"a": 1, "a": 2}', "f")
    with pytest.raises(CheckpointError, match="f is truncated or corrupted: NaN is not JSON"):
        parse_json('{"a": NaN}', "f")
    with pytest.raises(CheckpointError, match=r"f is truncated or corrupted: .*digits"):
        parse_json("1" * 5000, "f")
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(ok, "f") is not None
    for depth in (MAX_JSON_DEPTH + 1, 200_000):
        with pytest.raises(CheckpointError, match="f: JSON nested too deeply"):
            parse_json("[" * depth + "]" * depth, "f")
    with pytest.raises(CheckpointError, match="f: JSON nested too deeply"):
        parse_json('{"a":' * 100 + "1" + "}" * 100, "f")
