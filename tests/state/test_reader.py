"""Reading a checkpoint's structure: truncated, corrupted, malformed and mixed files are CheckpointErrors."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import hf_optim
from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    has_state,
    save_state,
)
from tests.state.helpers import (
    OPTIMIZERS,
    assert_load_fails_unchanged,
    big_setup,
    make_setup,
    rewrite_metadata,
    target,
)


def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def test_truncated_file(saved):
    path = saved / OPTIMIZER_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert_load_fails_unchanged(
        saved, target(), r"optimizer\.safetensors.*truncated or corrupted", CheckpointError
    )


def test_truncated_accumulator_file(saved):
    path = saved / ACCUMULATOR_NAME
    path.write_bytes(path.read_bytes()[:-4])
    assert_load_fails_unchanged(saved, target(), r"accumulator\.safetensors.*truncated", CheckpointError)


def test_corrupted_header(saved):
    path = saved / OPTIMIZER_NAME
    data = bytearray(path.read_bytes())
    data[12:20] = b"\xff\xfe{{{{{{"
    path.write_bytes(bytes(data))
    assert_load_fails_unchanged(saved, target(), r"optimizer\.safetensors", CheckpointError)


def test_corrupted_scheduler_json(saved):
    path = saved / SCHEDULER_NAME
    path.write_text(path.read_text()[:50])
    assert_load_fails_unchanged(saved, target(), r"scheduler\.json.*truncated or corrupted", CheckpointError)


def test_unknown_format_version(saved):
    rewrite_metadata(saved / OPTIMIZER_NAME, lambda m: m.update(format_version=2))
    assert_load_fails_unchanged(saved, target(), "unknown format version 2", CheckpointError)


def test_not_an_hf_optim_file(saved):
    path = saved / OPTIMIZER_NAME
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path))
    assert_load_fails_unchanged(saved, target(), "not an hf_optim state file", CheckpointError)


def test_metadata_that_disagrees_with_tensors(saved):
    def change(meta):
        node = meta["state"]["encoder.weight"]["exp_avg"]
        node["shape"] = [1, 2]

    rewrite_metadata(saved / OPTIMIZER_NAME, change)
    assert_load_fails_unchanged(saved, target(), r"state\.encoder\.weight\.exp_avg", CheckpointError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            _set(("state", "encoder.weight", "exp_avg", "shape"), 3),
            "tensor 'state.encoder.weight.exp_avg' has a malformed shape 3",
        ),
        (
            _set(("state", "encoder.weight", "exp_avg", "tensor"), ["x"]),
            r"tensor \['x'\] is listed in the metadata but is not",
        ),
        (_set(("state", "encoder.weight", "exp_avg", "python"), "int"), "cannot hold a Python 'int'"),
        (_set(("state", "encoder.weight"), [1]), r"the state of parameter 'encoder.weight' is \[1\]"),
        (
            _set(("param_groups", 0, "params", 0, "shape"), "abc"),
            "parameter 'encoder.weight' has a malformed shape",
        ),
        (_set(("optimizer",), "x"), "'optimizer' is 'x'"),
        (_set(("extra",), [1]), r"'extra' is \[1\], not an object"),
        (_set(("files",), ["scheduler.json"]), r"'files' is \['scheduler.json'\], not an object"),
    ],
    ids=[
        "shape-int",
        "tensor-key-list",
        "python-on-float32",
        "state-list",
        "param-shape-str",
        "optimizer-str",
        "extra-list",
        "files-list",
    ],
)
def test_malformed_metadata_is_a_checkpoint_error_naming_the_file(saved, change, match):
    rewrite_metadata(saved / OPTIMIZER_NAME, change)
    match = r"optimizer\.safetensors: (malformed metadata: )?.*" + match
    assert_load_fails_unchanged(saved, target(), match, CheckpointError)
    assert not has_state(saved)
    with pytest.raises(CheckpointError, match=match):
        hf_optim.inspect_state(saved)


def test_malformed_index_and_scheduler_json_are_checkpoint_errors(tmp_path, saved):
    path = saved / SCHEDULER_NAME
    doc = json.loads(path.read_text())
    doc["state_dict"]["dict"]["last_epoch"] = {"tensor": "x", "dtype": "int64", "shape": []}
    path.write_text(json.dumps(doc))
    match = r"scheduler\.json: tensor 'x' is not in the file"
    assert_load_fails_unchanged(saved, target(), match, CheckpointError)
    with pytest.raises(CheckpointError, match=match):
        hf_optim.inspect_state(saved)
    doc["state_dict"] = [1]
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"scheduler\.json: state_dict is not a dictionary"):
        hf_optim.inspect_state(saved)

    model, opt, sched = big_setup()
    save_state(tmp_path / "sharded", opt, sched, max_shard_size=600)
    index_path = tmp_path / "sharded" / OPTIMIZER_INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = ["optimizer-00001-of-00002.safetensors"]
    index_path.write_text(json.dumps(index))
    match = r"optimizer\.safetensors\.index\.json: shard name \['optimizer-00001"
    assert_load_fails_unchanged(tmp_path / "sharded", (model, *big_setup()[1:], None), match, CheckpointError)
    assert not has_state(tmp_path / "sharded")
    index_path.write_text(json.dumps(index)[:-10])
    match = r"sharded/optimizer\.safetensors\.index\.json is truncated or corrupted"
    assert_load_fails_unchanged(tmp_path / "sharded", (model, *big_setup()[1:], None), match, CheckpointError)
    assert not has_state(tmp_path / "sharded")


def test_scheduler_json_must_record_the_checkpoint_id(saved):
    """The id companion() matched is, for a JSON document with a "weight_map", the one under "metadata"."""
    path = saved / SCHEDULER_NAME
    doc = json.loads(path.read_text())
    checkpoint_id = doc["checkpoint_id"]
    doc.update(checkpoint_id="0" * 32, weight_map={}, metadata={"hf_optim": {"checkpoint_id": checkpoint_id}})
    path.write_text(json.dumps(doc))
    assert_load_fails_unchanged(saved, target(), f"records checkpoint id '{'0' * 32}', not", CheckpointError)


def test_files_from_different_saves_are_refused(tmp_path, saved):
    _model, opt, sched = make_setup(OPTIMIZERS["hf_adamw"])
    save_state(tmp_path / "other", opt, sched)
    os.replace(tmp_path / "other" / SCHEDULER_NAME, saved / SCHEDULER_NAME)
    assert_load_fails_unchanged(saved, target(), "different checkpoint id", CheckpointError)


def test_missing_shard_and_escaping_index(tmp_path):
    model, opt, sched = big_setup()
    save_state(tmp_path, opt, sched, max_shard_size=600)
    index_path = tmp_path / OPTIMIZER_INDEX_NAME
    index = json.loads(index_path.read_text())
    objs = (model, *big_setup()[1:], None)

    bad = copy.deepcopy(index)
    key = next(iter(bad["weight_map"]))
    bad["weight_map"][key] = "../outside.safetensors"
    index_path.write_text(json.dumps(bad))
    assert_load_fails_unchanged(tmp_path, objs, "would leave the checkpoint directory", CheckpointError)
    bad["weight_map"][key] = "/etc/passwd"
    index_path.write_text(json.dumps(bad))
    assert_load_fails_unchanged(tmp_path, objs, "would leave the checkpoint directory", CheckpointError)

    index_path.write_text(json.dumps(index))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    assert_load_fails_unchanged(tmp_path, objs, f"{shard} is listed by .* but missing", FileNotFoundError)


def test_missing_directory_and_no_state(tmp_path):
    objs = target()
    assert_load_fails_unchanged(
        tmp_path / "nope", objs, "neither a local directory nor a Hub repo id", FileNotFoundError
    )
    (tmp_path / "empty").mkdir()
    assert_load_fails_unchanged(tmp_path / "empty", objs, "no optimizer state in", FileNotFoundError)


@pytest.mark.parametrize("too_deep_for", ["json", "decoding"])
def test_deeply_nested_metadata_is_a_clear_error(saved, too_deep_for):
    # the JSON parser fails beyond the recursion limit; decoding (2 frames a level) at 3/5 of it already
    depth = 5 * sys.getrecursionlimit() if too_deep_for == "json" else 3 * sys.getrecursionlimit() // 5
    deep = "[" * depth + "]" * depth
    path = saved / OPTIMIZER_NAME
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    md["hf_optim"] = md["hf_optim"].replace(
        '"hyperparameters": {', '"hyperparameters": {"deep": ' + deep + ", ", 1
    )
    md["hf_optim"] = md["hf_optim"].replace(
        '"hyperparameters":{', '"hyperparameters":{"deep":' + deep + ",", 1
    )
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    assert_load_fails_unchanged(saved, target(), "nested too deeply", CheckpointError)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        hf_optim.inspect_state(saved)
    if too_deep_for == "json":
        assert not has_state(saved)
