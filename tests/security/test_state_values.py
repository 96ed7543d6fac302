"""Hostile values in checkpoints against the documented load guarantees (docs/security.md, docs/FORMAT.md
"Loading"): each test asserts the guaranteed behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    inspect_state,
    load_state,
    save_state,
)
from tests.state.helpers import (
    assert_live_unchanged,
    assert_refused,
    live_snapshot,
    rewrite_safetensors,
    trained,
)


@pytest.fixture
def saved(tmp_path):
    _, opt, sched, acc = trained()
    save_state(tmp_path / "ckpt", opt, sched, acc)
    return tmp_path / "ckpt"


def _edit_meta(path, change, change_tensors=None):
    def md(mdict):
        meta = json.loads(mdict["hf_optim"])
        change(meta)
        mdict["hf_optim"] = json.dumps(meta)

    rewrite_safetensors(path, md, change_tensors)


def _edit_scheduler(path, change):
    doc = json.loads(path.read_text())
    change(doc["state_dict"]["dict"])
    path.write_text(json.dumps(doc))


def _state_tensors(opt):
    return [
        (id(p), k, v)
        for g in opt.param_groups
        for p in g["params"]
        for k, v in opt.state[p].items()
        if isinstance(v, torch.Tensor)
    ]


@pytest.mark.parametrize("entry", ["step", "exp_avg"])
def test_one_tensor_referenced_by_two_parameters_is_refused(saved, entry):
    """The file makes head.weight's state the SAME tensor object as encoder.weight's: a load must not alias
    state between parameters (stepping would update it twice / mix two parameters' moments)."""
    victim = "head.weight" if entry == "step" else "encoder.bias"
    source = "encoder.weight" if entry == "step" else "norm.weight"  # same shapes ([8] / [8]) for exp_avg
    removed = f"state.{victim}.{entry}"

    def change(meta):
        meta["state"][victim][entry] = dict(meta["state"][source][entry])

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.pop(removed))
    objs = trained(seed=9, steps=3)
    _, opt, sched, acc = objs
    try:
        load_state(saved, opt, sched, acc)
    except CheckpointError as err:
        assert OPTIMIZER_NAME in str(err)
        return
    seen = {}
    for pid, key, tensor in _state_tensors(opt):
        ptr = tensor.untyped_storage().data_ptr()
        assert ptr not in seen or tensor.numel() == 0, f"state {key!r} shares memory with {seen[ptr]}"
        seen[ptr] = (pid, key)


@pytest.mark.parametrize("factory", ["torch_adamw", "hf_adamw"])
def test_tensor_for_an_optional_bool_hyperparameter_is_refused(tmp_path, factory):
    """``foreach`` is None in the live group; the file sets it to a 3-element tensor. With torch's AdamW
    load_state accepts it and the next step() fails ('Boolean value of Tensor with more than one value is
    ambiguous'); with hf_optim's AdamW the load raises that bare RuntimeError (no file named)."""
    _, opt, sched, acc = trained(factory=factory)
    saved = tmp_path / "ckpt"
    save_state(saved, opt, sched, acc)

    def change(meta):
        meta["param_groups"][0]["hyperparameters"]["foreach"] = {
            "tensor": "x.foreach",
            "dtype": "float32",
            "shape": [3],
        }

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.__setitem__("x.foreach", torch.ones(3)))
    objs = trained(seed=9, steps=3, factory=factory)
    assert_refused(saved, objs, CheckpointError, OPTIMIZER_NAME, "foreach")


def test_huge_integer_step_is_a_checkpoint_error(saved):
    """A plain JSON int step (within Python's digit limit) passes check_param_state; torch's AdamW.__setstate__
    then raises a bare OverflowError that does not name the file."""

    def change(meta):
        meta["state"]["encoder.weight"]["step"] = 10**400

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.pop("state.encoder.weight.step"))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(base_lrs=[-5.0, -5.0]),
        lambda s: s.update(base_lrs=[{"float": "nan"}, 0.01]),
        lambda s: s.update(last_epoch=-50),
    ],
    ids=["negative-base_lrs", "nan-base_lrs", "negative-last_epoch"],
)
def test_scheduler_state_cannot_smuggle_a_negative_learning_rate(saved, change):
    """A group ``lr`` < 0 or NaN is refused in the optimizer metadata; through scheduler.json it is accepted and
    the next scheduler.step() sets a negative / NaN learning rate on the optimizer."""
    _edit_scheduler(saved / SCHEDULER_NAME, change)
    objs = trained(seed=9, steps=3)
    _, opt, sched, acc = objs
    try:
        load_state(saved, opt, sched, acc)
    except CheckpointError as err:
        assert SCHEDULER_NAME in str(err)
        return
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(lr == lr and lr >= 0 for lr in lrs), f"learning rates after one scheduler step: {lrs}"


def test_plateau_scheduler_bad_mode_names_the_file(tmp_path):
    _, opt, _, _ = trained()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    save_state(tmp_path / "c", opt, sched)
    _edit_scheduler(tmp_path / "c" / SCHEDULER_NAME, lambda s: s.update(mode="bogus"))
    _, opt2, _, _ = trained(seed=9, steps=3)
    sched2 = torch.optim.lr_scheduler.ReduceLROnPlateau(opt2)
    assert_refused(tmp_path / "c", (None, opt2, sched2, None), (CheckpointError, ValueError), SCHEDULER_NAME)


@pytest.mark.parametrize("field", ["step", "num_items"])
def test_negative_accumulator_counter_names_the_file(saved, field):
    def change(meta):
        meta["state"]["dict"][field] = -3

    _edit_meta(saved / ACCUMULATOR_NAME, change)
    assert_refused(saved, trained(seed=9, steps=3), (CheckpointError, ValueError), ACCUMULATOR_NAME)


def _inspect_cli(path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "inspect", *args, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_non_string_info_is_refused(saved):
    """FORMAT.md: ``info`` is an object of strings. An int there crashes ``hf-optim inspect`` with a TypeError
    traceback (inspect_cmd._table) instead of one error line naming the file."""
    _edit_meta(saved / OPTIMIZER_NAME, lambda m: m.update(info={"source": 7}))
    with pytest.raises(CheckpointError, match=OPTIMIZER_NAME):
        inspect_state(saved)
    proc = _inspect_cli(saved)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]


def test_inspect_json_with_tuple_dictionary_keys(saved):
    """A hyperparameter ``{"items": [[{"tuple": [1, 2]}, 0.5]]}`` decodes to ``{(1, 2): 0.5}``; ``hf-optim
    inspect --json`` then dies in json.dumps with a traceback."""

    def change(meta):
        meta["param_groups"][0]["hyperparameters"]["betas"] = {"items": [[{"tuple": [1, 2]}, 0.5]]}

    _edit_meta(saved / OPTIMIZER_NAME, change)
    proc = _inspect_cli(saved, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert proc.returncode in (0, 2)


def test_snapshots_named_local_folder_does_not_widen_the_roots(tmp_path):
    """A plain local folder that merely lives under a directory called ``snapshots`` is not a Hugging Face
    cache; a symlink from it into a sibling ``blobs`` folder leaves the checkpoint folder and must be refused."""
    _, opt, sched, acc = trained()
    ckpt = tmp_path / "snapshots" / "run" / "ckpt"
    save_state(ckpt, opt, sched, acc)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(ckpt / SCHEDULER_NAME, blobs / "outside.json")
    os.symlink(blobs / "outside.json", ckpt / SCHEDULER_NAME)
    objs = trained(seed=9, steps=3)
    before = live_snapshot(objs[1], objs[2], objs[3])
    with pytest.raises(CheckpointError, match="outside"):
        load_state(ckpt, objs[1], objs[2], objs[3])
    assert_live_unchanged(before, objs[1], objs[2], objs[3])


def _utf16_deep_scheduler(path, depth):
    """Re-encode scheduler.json as UTF-16-LE (json.loads accepts it) with a list nested ``depth`` deep. A
    character U+2200 encodes as the bytes 00 22: a stray '"' for the byte-level regex that strips strings
    before counting brackets, so the nesting is hidden from format._too_deep."""
    doc = json.loads(path.read_text())
    inner = dict(doc["state_dict"]["dict"], pad="\u2200")
    body = json.dumps(inner, ensure_ascii=False)[:-1]
    body += ', "zz": ' + "[" * depth + "]" * depth + ', "zz2": "y"}'
    top = json.dumps({k: v for k, v in doc.items() if k != "state_dict"}, ensure_ascii=False)[:-1]
    path.write_bytes((top + ', "state_dict": {"dict": ' + body + "}}").encode("utf-16-le"))


def test_nesting_hidden_by_utf16_is_refused(saved):
    """FORMAT.md "JSON limits": nesting deeper than 64 is a CheckpointError naming the file, never a
    RecursionError. A UTF-16 scheduler.json nested 600 deep reaches codec.decode and raises RecursionError."""
    _utf16_deep_scheduler(saved / SCHEDULER_NAME, 600)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME)
    with pytest.raises(CheckpointError, match=SCHEDULER_NAME):
        inspect_state(saved)


def test_complex_moment_for_a_real_parameter_is_refused(saved):
    """FORMAT.md: non-scalar state tensors have a floating dtype. A complex64 exp_avg for a float32 parameter
    loads (hf_optim even undoes torch's cast to real), and the next step() raises."""
    key = "state.encoder.weight.exp_avg"

    def change(meta):
        meta["state"]["encoder.weight"]["exp_avg"]["dtype"] = "complex64"

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.__setitem__(key, t[key].to(torch.complex64)))
    for fresh in (False, True):
        assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, fresh=fresh)


def test_integer_gradient_into_a_fresh_accumulator_is_refused(saved):
    """Resuming creates a fresh GradientAccumulator, for which no gradient count / shape / dtype is checked:
    an int64 gradient loads and the first accumulation raises 'result type Float can't be cast to Long'."""
    import hf_optim

    def change(meta):
        meta["state"]["dict"]["gradients"][0]["dtype"] = "int64"

    name = "state.gradients.0"
    _edit_meta(saved / ACCUMULATOR_NAME, change, lambda t: t.__setitem__(name, t[name].to(torch.int64)))
    _, opt, sched, _ = trained(seed=9, steps=3)
    assert_refused(
        saved, (None, opt, sched, hf_optim.GradientAccumulator()), CheckpointError, ACCUMULATOR_NAME
    )


@pytest.mark.parametrize("factory", ["torch_adamw", "hf_adamw"])
def test_state_missing_a_moment_is_refused_for_a_fresh_optimizer(tmp_path, factory):
    """Saved AdamW state for encoder.weight without exp_avg: torch's AdamW loads it and step() raises
    KeyError('exp_avg'); hf_optim's AdamW raises its own ValueError from load_state_dict, not naming the file."""
    _, opt, sched, acc = trained(factory=factory)
    saved = tmp_path / "ckpt"
    save_state(saved, opt, sched, acc)

    def change(meta):
        del meta["state"]["encoder.weight"]["exp_avg"]

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.pop("state.encoder.weight.exp_avg"))
    objs = trained(seed=9, steps=3, factory=factory)
    assert_refused(saved, objs, CheckpointError, OPTIMIZER_NAME, fresh=True)


def test_group_order_in_the_file_does_not_pick_hyperparameters(saved):
    """strict=False. The file swaps which parameters each group lists (encoder.weight / head.weight now in group
    1 with weight_decay 0.0, the others in group 0 with weight_decay 0.5). Every parameter still matches by name,
    but group 0's saved hyperparameters go to live group 0, i.e. to encoder.weight, and LoadReport.complete is
    True. Either the hyperparameters follow the parameters, or the report must not claim a complete load."""

    def change(meta):
        groups = meta["param_groups"]
        groups[0]["params"], groups[1]["params"] = groups[1]["params"], groups[0]["params"]
        groups[0]["hyperparameters"]["weight_decay"] = 0.5
        groups[1]["hyperparameters"]["weight_decay"] = 0.0

    _edit_meta(saved / OPTIMIZER_NAME, change)
    model, opt, sched, acc = trained(seed=9, steps=3)
    report = load_state(saved, opt, sched, acc, strict=False)
    group_of_encoder = next(
        g for g in opt.param_groups if any(p is model.encoder.weight for p in g["params"])
    )
    assert not report.complete or group_of_encoder["weight_decay"] == 0.0, (
        report.complete,
        group_of_encoder["weight_decay"],
    )


def test_inspect_does_not_print_terminal_escapes(saved):
    """``optimizer.class`` / ``info`` come from the file; printed raw they carry terminal control sequences
    (here OSC 52, which asks the terminal to overwrite the clipboard) to the user's terminal."""
    evil = "\x1b]52;c;ZWNobyBwd25lZA==\x07torch.optim.adamw.AdamW"
    _edit_meta(saved / OPTIMIZER_NAME, lambda m: m.update(optimizer={"class": evil, "name": None}))
    proc = _inspect_cli(saved)
    assert proc.returncode in (0, 2), proc.stderr[-500:]
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr


def test_onecycle_phases_cannot_redirect_the_learning_rate(tmp_path):
    """OneCycleLR's ``_schedule_phases`` name the param-group keys its lr is interpolated between
    (``initial_lr`` / ``max_lr`` / ``min_lr``). scheduler.json may set them to ``weight_decay``: load_state
    accepts it (a str for a str) and the next step sets lr = weight_decay (0.1 here), outside [min_lr, max_lr]."""

    def make(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=100, cycle_momentum=False)

    _, opt, _, _ = trained()
    save_state(tmp_path / "c", opt, make(opt))

    def change(state):
        for phase in state["_schedule_phases"]:
            phase["dict"]["start_lr"] = phase["dict"]["end_lr"] = "weight_decay"

    _edit_scheduler(tmp_path / "c" / SCHEDULER_NAME, change)
    _, opt2, _, _ = trained(seed=9, steps=3)
    sched2 = make(opt2)
    try:
        load_state(tmp_path / "c", opt2, sched2)
    except CheckpointError as err:
        assert SCHEDULER_NAME in str(err)
        return
    sched2.step()
    lrs = [g["lr"] for g in opt2.param_groups]
    assert all(0.0 <= lr <= 0.01 for lr in lrs), f"OneCycleLR(max_lr=0.01) set lr {lrs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_scalar_moment_is_refused_for_a_fresh_optimizer(saved, dtype):
    """FORMAT.md: moments have the parameter's shape and a floating dtype. A 0-d exp_avg for the [8, 4]
    encoder.weight (even an int64 one) loads into an optimizer without state; step() then fails."""
    key = "state.encoder.weight.exp_avg"

    def change(meta):
        meta["state"]["encoder.weight"]["exp_avg"].update(shape=[], dtype=str(dtype).removeprefix("torch."))

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.__setitem__(key, torch.tensor(0, dtype=dtype)))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, fresh=True)


def test_local_subfolder_cannot_leave_the_directory(tmp_path):
    """``hf_optim.load_state(dir, subfolder="../x")`` refuses '..' (ValueError); the local layer
    ``hf_optim.state.load_state`` loads from outside ``dir`` instead."""
    from hf_optim import state

    _, opt, sched, acc = trained()
    save_state(tmp_path / "outside", opt, sched, acc)
    (tmp_path / "dir").mkdir()
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)
    with pytest.raises(ValueError, match="subfolder"):
        load_state(tmp_path / "dir", opt2, sched2, acc2, subfolder="../outside")
    with pytest.raises(ValueError, match="subfolder"):
        state.load_state(tmp_path / "dir", opt2, sched2, acc2, subfolder="../outside")


def test_state_without_step_is_a_checkpoint_error(saved):
    """AdamW state for encoder.weight without ``step``, loaded into a fresh torch AdamW: load_state raises
    KeyError('step') (not a CheckpointError, no file named)."""

    def change(meta):
        del meta["state"]["encoder.weight"]["step"]

    _edit_meta(saved / OPTIMIZER_NAME, change, lambda t: t.pop("state.encoder.weight.step"))
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, OPTIMIZER_NAME, fresh=True)


def test_other_optimizer_class_with_strict_false(tmp_path):
    """An SGD checkpoint loaded with strict=False into a fresh torch AdamW: load_state raises KeyError('step')
    from torch's Adam.__setstate__. Expected: the state is skipped (reported), or a CheckpointError."""
    _, sgd, _, _ = trained(factory="sgd_momentum")
    save_state(tmp_path / "c", sgd)
    _, opt, _, _ = trained(seed=9, steps=3)
    opt.state.clear()
    before = live_snapshot(opt)
    try:
        report = load_state(tmp_path / "c", opt, strict=False)
    except CheckpointError as err:
        assert OPTIMIZER_NAME in str(err)
        assert_live_unchanged(before, opt)
        return
    assert not report.complete


def test_unterminated_string_is_refused_in_one_pass(saved):
    """A 400 kB scheduler.json ``{"a": "\\"\\"\\"...`` (never closed) is refused as corrupted, naming the file.
    A string-stripping regex that restarts at every quote needs ~N^2 steps for it (minutes here) before the
    JSON parser, which refuses it at once, ever runs; the depth count must read each character once."""
    (saved / SCHEDULER_NAME).write_bytes(b'{"a": "' + b'\\"' * 200_000)
    assert_refused(saved, trained(seed=9, steps=3), CheckpointError, SCHEDULER_NAME)


def test_depth_count_skips_escaped_quotes_and_brackets_in_strings():
    """The nesting count ignores brackets inside strings, including after a long run of escaped quotes, and
    still counts the brackets after the string: 64 levels parse, 65 are refused (json.loads is the reference
    for the accepted value)."""
    from hf_optim.state.format import MAX_JSON_DEPTH, parse_json

    head = '{"a": "' + '\\"' * 100_000 + '[[[{{{", "b": '
    ok = head + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_json(ok, "x.json") == json.loads(ok)
    deep = head + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}"
    with pytest.raises(CheckpointError, match=r"x\.json: JSON nested too deeply"):
        parse_json(deep.encode(), "x.json")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32", "utf-8-sig"])
def test_json_bytes_must_be_utf8_without_bom(encoding):
    """json.loads guesses UTF-16 / UTF-32 and skips a UTF-8 BOM; the checkpoint format is UTF-8 only."""
    from hf_optim.state.format import parse_json

    with pytest.raises(CheckpointError, match=r"x\.json is not UTF-8"):
        parse_json('{"a": [1]}'.encode(encoding), "x.json")
