"""Hostile optimizer metadata: reserved names, bad hyperparameters, bad state tensors. Each load fails with a
CheckpointError naming the file and leaves every live object exactly as it was (compared with a deep snapshot
taken before the load)."""

from __future__ import annotations

import pytest
import torch

from hf_optim import OPTIMIZER_NAME, CheckpointError, load_state, save_state
from tests.state.helpers import assert_refused, change_hf_optim_metadata, rewrite_safetensors, trained


@pytest.fixture
def saved(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"


def _hyper(group, key, value):
    def change(meta):
        meta["param_groups"][group]["hyperparameters"][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_hyper(0, "params", [1, 0]), "hyperparameter named 'params'"),
        (_hyper(1, "param_names", ["a"]), "hyperparameter named 'param_names'"),
        (_hyper(0, "state", {"dict": {}}), "hyperparameter named 'state'"),
        (lambda meta: meta["extra"].update(state={"dict": {}}), "'extra' has an entry named 'state'"),
        (lambda meta: meta["extra"].update(param_groups=[]), "'extra' has an entry named 'param_groups'"),
    ],
    ids=["group-params", "group-param_names", "group-state", "extra-state", "extra-param_groups"],
)
def test_reserved_keys_are_refused(saved, change, match):
    change_hf_optim_metadata(saved / OPTIMIZER_NAME, change)
    for fresh in (False, True):
        assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, match, fresh=fresh)


def test_a_params_hyperparameter_cannot_permute_state(saved):
    """The reference: torch itself, given the hostile group, WOULD move state between parameters."""
    _, opt, _, _ = trained(seed=9, steps=3)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = list(reversed(sd["param_groups"][0]["params"]))
    first = opt.param_groups[0]["params"][0]
    expected_if_obeyed = sd["state"][sd["param_groups"][0]["params"][0]]["exp_avg"]
    assert not torch.equal(opt.state[first]["exp_avg"], expected_if_obeyed)
    change_hf_optim_metadata(saved / OPTIMIZER_NAME, _hyper(0, "params", [3, 2, 1, 0]))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, "reserved")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("lr", "abc", "'lr': expected a number"),
        ("lr", -1.0, "lr must be a non-negative number"),
        ("lr", {"float": "nan"}, "lr must be a non-negative number"),
        ("betas", {"tuple": [2, 3]}, r"betas must be two numbers in \[0, 1\)"),
        ("betas", {"tuple": [0.9]}, "'betas': expected a tuple of length 2"),
        ("betas", [0.9, 0.99], "'betas': expected a tuple of length 2"),
        ("eps", -1e-8, "eps must be a non-negative number"),
        ("weight_decay", True, "expected a number"),
        ("amsgrad", 1, "expected a bool"),
        ("maximize", "yes", "expected a bool"),
    ],
)
def test_bad_hyperparameters_are_refused(saved, key, value, match):
    change_hf_optim_metadata(saved / OPTIMIZER_NAME, _hyper(0, key, value))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, match)


def test_hyperparameters_the_optimizer_lacks(saved):
    change_hf_optim_metadata(saved / OPTIMIZER_NAME, _hyper(1, "injected", True))
    objs = trained(seed=9, steps=3)
    assert_refused(saved, objs, CheckpointError, OPTIMIZER_NAME, r"does not have: \['injected'\]")
    _, opt, sched, acc = objs
    report = load_state(saved, opt, sched, acc, strict=False)
    assert "injected" not in opt.param_groups[1]
    assert any("injected" in note for note in report.notes)


def test_the_optimizers_own_constructor_checks_apply(saved):
    """torch's AdamW refuses betas[1] = 1.0 only through its constructor's message, which is passed on."""
    change_hf_optim_metadata(saved / OPTIMIZER_NAME, _hyper(0, "betas", {"tuple": [0.9, 1.0]}))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, "betas")


def _state_tensor(name, value):
    def change(tensors):
        tensors[name] = value

    return change


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize(
    ("tensor", "dtype", "match"),
    [
        (torch.zeros(4, 8), "float32", r"has shape \(4, 8\), the parameter \(8, 4\)|has shape \(4, 8\)"),
        (torch.zeros(8, 4, dtype=torch.int32), "int32", "floating state only"),
        (torch.zeros(3), "float32", r"has shape \(3,\)"),
    ],
    ids=["transposed", "int", "wrong-size"],
)
def test_state_tensors_must_fit_their_parameter(saved, tensor, dtype, match, fresh):
    key = "state.encoder.weight.exp_avg"

    def meta_change(meta):
        meta["state"]["encoder.weight"]["exp_avg"].update(dtype=dtype, shape=list(tensor.shape))

    import json

    def md_change(md):
        meta = json.loads(md["hf_optim"])
        meta_change(meta)
        md["hf_optim"] = json.dumps(meta)

    rewrite_safetensors(saved / OPTIMIZER_NAME, md_change, _state_tensor(key, tensor))
    assert_refused(
        saved, trained(seed=9, steps=3), (CheckpointError, ValueError), OPTIMIZER_NAME, match, fresh=fresh
    )


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize(
    ("entry", "value", "match"),
    [
        ("exp_avg", "abc", "must be a tensor"),
        ("exp_avg", 1.5, "must be a tensor"),
        ("exp_avg_sq", None, "must be a tensor"),
        ("step", "abc", "step counter must be a number"),
        ("step", [1], "step counter must be a number"),
    ],
)
def test_non_tensor_state_where_a_tensor_is_expected(saved, entry, value, match, fresh):
    def change(meta):
        node = meta["state"]["encoder.weight"]
        removed = node[entry].get("tensor") if isinstance(node[entry], dict) else None
        node[entry] = value
        change.removed = removed

    import json

    def md_change(md):
        meta = json.loads(md["hf_optim"])
        change(meta)
        md["hf_optim"] = json.dumps(meta)

    def drop(tensors):
        tensors.pop(change.removed, None)

    rewrite_safetensors(saved / OPTIMIZER_NAME, md_change, drop)
    assert_refused(
        saved, trained(seed=9, steps=3), (CheckpointError, ValueError), OPTIMIZER_NAME, match, fresh=fresh
    )
