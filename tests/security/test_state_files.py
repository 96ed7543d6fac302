"""Hostile single-process checkpoints, one attack table: files that are not regular files or lie outside the
folder, hostile JSON (duplicate keys, deep nesting, huge numbers, encodings), optimizer metadata (reserved names,
bad hyperparameters, state tensors that do not fit), scheduler.json and accumulator.safetensors values.

Every row is refused with an error naming the file and leaves every live object exactly as it was (optimizer
state and groups, the scheduler's whole ``__dict__``, the accumulator), unless the row says how a successful load
is harmless. The checkpoints are saved once per session and copied for each row."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from hf_optim import (
    ACCUMULATOR_NAME,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    has_state,
    inspect_state,
    load_state,
    save_state,
    state,
)
from hf_optim.state.format import MAX_JSON_DEPTH, parse_json
from tests.run_cache import once_per_run
from tests.security.attacks import (
    StateAttack,
    copy_checkpoint,
    edit_json,
    edit_meta,
    edit_scheduler,
    link_out_through_blobs,
    refuses,
    replace,
    run_state_attack,
    save_checkpoint,
)
from tests.security.cli_batch import run_batch
from tests.state.helpers import trained

OPT, SCHED, ACC = OPTIMIZER_NAME, SCHEDULER_NAME, ACCUMULATOR_NAME


def _no_state(folder):
    assert not has_state(folder)


def _hyper(group, key, value):
    return lambda d: edit_meta(
        d / OPT, lambda m: m["param_groups"][group]["hyperparameters"].update({key: value})
    )


def _meta(change):
    return lambda d: edit_meta(d / OPT, change)


def _sched(change):
    return lambda d: edit_scheduler(d / SCHED, change)


def _tensor_entry(dtype, tensor):
    """encoder.weight's exp_avg replaced by ``tensor`` (its metadata record saying ``dtype`` and its shape)."""
    key = "state.encoder.weight.exp_avg"

    def change(meta):
        meta["state"]["encoder.weight"]["exp_avg"].update(dtype=dtype, shape=list(tensor.shape))

    return lambda d: edit_meta(d / OPT, change, lambda t: t.__setitem__(key, tensor))


def _entry_value(entry, value):
    """encoder.weight's state entry ``entry`` replaced by the plain JSON ``value`` (its tensor removed)."""

    def make(d):
        removed = []

        def change(meta):
            node = meta["state"]["encoder.weight"]
            removed.append(node[entry].get("tensor") if isinstance(node[entry], dict) else None)
            node[entry] = value

        edit_meta(d / OPT, change, lambda t: t.pop(removed[0], None))

    return make


def _drop_entry(entry, param="encoder.weight"):
    def change(meta):
        del meta["state"][param][entry]

    return lambda d: edit_meta(d / OPT, change, lambda t: t.pop(f"state.{param}.{entry}"))


def _alias(entry):
    """head.weight's (or encoder.bias's) state entry made the SAME tensor record as another parameter's."""
    victim = "head.weight" if entry == "step" else "encoder.bias"
    source = "encoder.weight" if entry == "step" else "norm.weight"  # same shapes ([8] / [8]) for exp_avg

    def change(meta):
        meta["state"][victim][entry] = dict(meta["state"][source][entry])

    return lambda d: edit_meta(d / OPT, change, lambda t: t.pop(f"state.{victim}.{entry}"))


def _no_aliased_state(objs, report):
    """A load must not alias state between parameters (a step would update it twice)."""
    opt = objs[1]
    seen = {}
    for p in (p for g in opt.param_groups for p in g["params"]):
        for key, tensor in opt.state[p].items():
            if isinstance(tensor, torch.Tensor):
                ptr = tensor.untyped_storage().data_ptr()
                assert ptr not in seen or tensor.numel() == 0, f"state {key!r} shares memory with {seen[ptr]}"
                seen[ptr] = key


def _lrs_valid_after_a_step(low, high):
    def check(objs, report):
        objs[2].step()
        lrs = [g["lr"] for g in objs[1].param_groups]
        assert all(lr == lr and low <= lr <= high for lr in lrs), f"learning rates after one step: {lrs}"

    return check


def _encoder_group_keeps_its_decay(objs, report):
    """Either the hyperparameters follow the parameters, or the report does not claim a complete load."""
    model, opt = objs[0], objs[1]
    group = next(g for g in opt.param_groups if any(p is model.encoder.weight for p in g["params"]))
    assert not report.complete or group["weight_decay"] == 0.0, (report.complete, group["weight_decay"])


def _not_complete(objs, report):
    assert not report.complete


def _swap_group_members(meta):
    groups = meta["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[1]["params"], groups[0]["params"]
    groups[0]["hyperparameters"]["weight_decay"] = 0.5
    groups[1]["hyperparameters"]["weight_decay"] = 0.0


def _utf16_deep_scheduler(d, depth=600):
    """scheduler.json re-encoded as UTF-16-LE (json.loads accepts it) with a list nested ``depth`` deep. U+2200
    encodes as the bytes 00 22: a stray '"' for a byte-level scan that skips strings before counting brackets."""
    path = d / SCHED
    doc = json.loads(path.read_text())
    body = json.dumps(dict(doc["state_dict"]["dict"], pad="\u2200"), ensure_ascii=False)[:-1]
    body += ', "zz": ' + "[" * depth + "]" * depth + ', "zz2": "y"}'
    top = json.dumps({k: v for k, v in doc.items() if k != "state_dict"}, ensure_ascii=False)[:-1]
    path.write_bytes((top + ', "state_dict": {"dict": ' + body + "}}").encode("utf-16-le"))


def _huge_last_epoch(d):
    path = d / SCHED
    edit_scheduler(path, lambda s: s.update(last_epoch=0))
    path.write_text(path.read_text().replace('"last_epoch": 0', '"last_epoch": ' + "9" * 5000))


def _deep_index(depth):
    def make(d):
        path = d / OPTIMIZER_INDEX_NAME
        edit_json(path, lambda doc: doc["metadata"]["hf_optim"]["extra"].update(deep=0))
        path.write_text(path.read_text().replace('"deep": 0', '"deep": ' + "[" * depth + "]" * depth))

    return make


def _lying_header(d):
    raw = bytearray((d / ACC).read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 4)
    (d / ACC).write_bytes(bytes(raw))


def _escape_outside(d):
    outside = d.parent / "outside.json"
    os.rename(d / SCHED, outside)  # a valid file: only its place is wrong
    os.symlink(outside, d / SCHED)


def _onecycle_phases(s):
    for phase in s["_schedule_phases"]:
        phase["dict"]["start_lr"] = phase["dict"]["end_lr"] = "weight_decay"


def _foreach_tensor(d):
    record = {"tensor": "x.foreach", "dtype": "float32", "shape": [3]}
    edit_meta(
        d / OPT,
        lambda m: m["param_groups"][0]["hyperparameters"].update(foreach=record),
        lambda t: t.__setitem__("x.foreach", torch.ones(3)),
    )


def _int_gradient(d):
    name = "state.gradients.0"

    def change(meta):
        meta["state"]["dict"]["gradients"][0]["dtype"] = "int64"

    edit_meta(d / ACC, change, lambda t: t.__setitem__(name, t[name].to(torch.int64)))


def _huge_step(d):
    edit_meta(
        d / OPT,
        lambda m: m["state"]["encoder.weight"].update(step=10**400),
        lambda t: t.pop("state.encoder.weight.step"),
    )


def _duplicate_metadata_key(d):
    def dup(md):
        md["hf_optim"] = md["hf_optim"].replace('"keyed_by":', '"keyed_by": "index", "keyed_by":', 1)

    from tests.state.helpers import rewrite_safetensors

    rewrite_safetensors(d / OPT, dup)


A = StateAttack
_HYPERPARAMETERS = [
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
    (
        "betas",
        {"tuple": [0.9, 1.0]},
        "betas",
    ),  # refused only by torch AdamW's constructor: its message passed on
]
_RESERVED = [
    ("group-params", _hyper(0, "params", [3, 2, 1, 0]), "hyperparameter named 'params'"),
    ("group-param_names", _hyper(1, "param_names", ["a"]), "hyperparameter named 'param_names'"),
    ("group-state", _hyper(0, "state", {"dict": {}}), "hyperparameter named 'state'"),
    (
        "extra-state",
        _meta(lambda m: m["extra"].update(state={"dict": {}})),
        "'extra' has an entry named 'state'",
    ),
    (
        "extra-param_groups",
        _meta(lambda m: m["extra"].update(param_groups=[])),
        "'extra' has an entry named 'param_groups'",
    ),
]
_TENSORS = [
    ("transposed", _tensor_entry("float32", torch.zeros(4, 8)), r"has shape \(4, 8\)"),
    ("int", _tensor_entry("int32", torch.zeros(8, 4, dtype=torch.int32)), "floating state only"),
    ("wrong-size", _tensor_entry("float32", torch.zeros(3)), r"has shape \(3,\)"),
    ("complex", _tensor_entry("complex64", torch.zeros(8, 4, dtype=torch.complex64)), None),
    ("exp_avg-str", _entry_value("exp_avg", "abc"), "must be a tensor"),
    ("exp_avg-float", _entry_value("exp_avg", 1.5), "must be a tensor"),
    ("exp_avg_sq-none", _entry_value("exp_avg_sq", None), "must be a tensor"),
    ("step-str", _entry_value("step", "abc"), "step counter must be a number"),
    ("step-list", _entry_value("step", [1]), "step counter must be a number"),
]
_SCHEDULER = [
    ("extra-optimizer", lambda s: s.update(optimizer=None), "expected keys"),
    ("lr_lambdas-str", lambda s: s.update(lr_lambdas="x"), "lr_lambdas"),
    ("missing-last_epoch", lambda s: s.pop("last_epoch"), "expected keys"),
    ("last_epoch-str", lambda s: s.update(last_epoch="abc"), "last_epoch"),
    ("last_epoch-float", lambda s: s.update(last_epoch=2.5), "last_epoch must be an int"),
    ("last_epoch-bool", lambda s: s.update(last_epoch=True), "last_epoch"),
    ("base_lrs-str", lambda s: s.update(base_lrs=["a", "b"]), r"base_lrs'\]\[\d\]: expected a number"),
    ("last_lr-short", lambda s: s.update(_last_lr=[0.1]), "_last_lr'\\]: expected a list of length 2"),
    (
        "last_lr-tuple",
        lambda s: s.update(_last_lr={"tuple": [0.1, 0.2]}),
        "_last_lr'\\]: expected a list of length 2",
    ),
    ("step_count-none", lambda s: s.update(_step_count=None), "_step_count'\\]: expected a number"),
    (
        # hf_optim's schedule callables keep no state: nothing may be injected into their __dict__
        "lr_lambda-state-for-a-function",
        lambda s: s.update(lr_lambdas=[{"dict": {"func": 1}}, {"dict": {}}]),
        r"lr_lambdas'\]\[0\]: expected keys \[\], got \['func'\]",
    ),
]

ATTACKS = [
    # what lies at a file's place
    *(
        A(f"fifo-{n}", n, lambda d, n=n: replace(d / n, os.mkfifo), "not a regular file", then=_no_state)
        for n in (SCHED, ACC, OPT)
    ),
    *(
        A(f"directory-{n}", n, lambda d, n=n: replace(d / n, os.mkdir), "not a regular file")
        for n in (SCHED, OPT)
    ),
    A(
        "device-link",
        SCHED,
        lambda d: replace(d / SCHED, lambda p: os.symlink("/dev/zero", p)),
        "outside the checkpoint",
    ),
    A(
        "device-inside-the-roots",  # the S_ISREG test, with /dev made a root
        SCHED,
        lambda d: replace(d / SCHED, lambda p: os.symlink("/dev/zero", p)),
        "not a regular file",
        load=state.load_state,
        options=lambda d: {"roots": [str(d), "/dev"]},
    ),
    A("link-out-of-the-folder", SCHED, _escape_outside, "outside the checkpoint"),
    *(
        A(
            f"blobs-link-out-{n}",
            n,
            lambda d, n=n: link_out_through_blobs(d, n),
            "outside the checkpoint",
            at="evil/models--x/snapshots/abc",
            then=refuses(inspect_state, n, "outside the checkpoint"),
        )
        for n in (SCHED, OPT)
    ),
    A(
        "blobs-link-to-root",  # scheduler.json -> ../../blobs/etc/passwd with blobs -> /: never opened
        SCHED,
        lambda d: link_out_through_blobs(d, SCHED, to_root=True),
        "outside the checkpoint",
        at="evil/models--x/snapshots/abc",
    ),
    A(
        "blobs-link-out-of-a-folder-named-snapshots",  # a plain folder under 'snapshots' is no cache
        SCHED,
        lambda d: link_out_through_blobs(d, SCHED),
        "outside",
        at="snapshots/run/ckpt",
    ),
    # JSON and safetensors framing
    A(
        "duplicate-json-key",
        SCHED,
        lambda d: (d / SCHED).write_text(
            (d / SCHED).read_text().replace('"format":', '"format": "x", "format":', 1)
        ),
        "duplicate key 'format'",
    ),
    A("duplicate-metadata-key", OPT, _duplicate_metadata_key, "duplicate key 'keyed_by'"),
    A("huge-number", SCHED, _huge_last_epoch, "digits|integer", then=refuses(inspect_state, SCHED)),
    *(
        A(
            f"nested-{depth}",
            OPTIMIZER_INDEX_NAME,
            _deep_index(depth),
            "nested too deeply",
            saved="sharded",
            then=_no_state,
        )
        for depth in (100, 100_000)
    ),
    A("utf16-hidden-nesting", SCHED, _utf16_deep_scheduler, then=refuses(inspect_state, SCHED)),
    A("unterminated-string", SCHED, lambda d: (d / SCHED).write_bytes(b'{"a": "' + b'\\"' * 200_000)),
    A("header-lies-about-its-size", ACC, _lying_header),
    # optimizer metadata: names that would pick which parameter gets which state, hyperparameters
    *(
        A(f"reserved-{i}{'-fresh' * f}", OPT, make, match, fresh=f)
        for i, make, match in _RESERVED
        for f in (0, 1)
    ),
    *(A(f"hyperparameter-{k}-{v}", OPT, _hyper(0, k, v), match) for k, v, match in _HYPERPARAMETERS),
    A(
        "hyperparameter-the-optimizer-lacks",
        OPT,
        _hyper(1, "injected", True),
        r"does not have: \['injected'\]",
    ),
    *(
        A(f"foreach-tensor-{k}", OPT, _foreach_tensor, "foreach", saved=k)
        for k in ("torch_adamw", "hf_adamw")
    ),
    # optimizer state entries
    *(
        A(f"tensor-{i}{'-fresh' * f}", OPT, make, match, exc=(CheckpointError, ValueError), fresh=f)
        for i, make, match in _TENSORS
        for f in (0, 1)
    ),
    *(
        A(f"scalar-moment-{t}", OPT, _tensor_entry(str(t)[6:], torch.tensor(0, dtype=t)), fresh=True)
        for t in (torch.float32, torch.int64)
    ),
    *(
        A(f"missing-moment-{k}", OPT, _drop_entry("exp_avg"), fresh=True, saved=k)
        for k in ("torch_adamw", "hf_adamw")
    ),
    A("missing-step", OPT, _drop_entry("step"), fresh=True),
    A("huge-integer-step", OPT, _huge_step),
    *(A(f"aliased-{e}", OPT, _alias(e), harmless=_no_aliased_state) for e in ("step", "exp_avg")),
    A(
        "swapped-group-members",
        OPT,
        _meta(_swap_group_members),
        options=lambda d: {"strict": False},
        harmless=_encoder_group_keeps_its_decay,
    ),
    A(
        "another-optimizer-class",
        OPT,
        lambda d: None,
        saved="sgd",
        fresh=True,
        options=lambda d: {"strict": False},
        harmless=_not_complete,
    ),
    # scheduler.json
    *(A(f"scheduler-{i}", SCHED, _sched(change), match) for i, change, match in _SCHEDULER),
    A(
        "scheduler-type-strict-false",
        SCHED,
        _sched(lambda s: s.update(last_epoch="abc")),
        "last_epoch",
        options=lambda d: {"strict": False},
    ),
    *(
        A(f"scheduler-{i}", SCHED, _sched(change), harmless=_lrs_valid_after_a_step(0.0, float("inf")))
        for i, change in [
            ("negative-base_lrs", lambda s: s.update(base_lrs=[-5.0, -5.0])),
            ("nan-base_lrs", lambda s: s.update(base_lrs=[{"float": "nan"}, 0.01])),
            ("negative-last_epoch", lambda s: s.update(last_epoch=-50)),
        ]
    ),
    A(
        "plateau-bad-mode",
        SCHED,
        _sched(lambda s: s.update(mode="bogus")),
        exc=(CheckpointError, ValueError),
        saved="plateau",
    ),
    A(
        "one-cycle-phases-name-weight_decay",
        SCHED,
        _sched(_onecycle_phases),
        saved="one_cycle",
        harmless=_lrs_valid_after_a_step(0.0, 0.01),
    ),
    # accumulator.safetensors
    *(
        A(
            f"negative-accumulator-{f}",
            ACC,
            lambda d, f=f: edit_meta(d / ACC, lambda m: m["state"]["dict"].update({f: -3})),
            exc=(CheckpointError, ValueError),
        )
        for f in ("step", "num_items")
    ),
    A("integer-gradient-into-a-fresh-accumulator", ACC, _int_gradient, live="fresh_accumulator"),
]


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """Each kind of checkpoint saved once per session (per xdist worker), on first use."""
    root = tmp_path_factory.mktemp("pristine")
    saved = {}

    def get(kind):
        if kind not in saved:
            save_checkpoint(kind, root / kind)
            saved[kind] = root / kind
        return saved[kind]

    return get


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_hostile_checkpoint(attack, pristine, tmp_path):
    folder = copy_checkpoint(pristine(attack.saved), tmp_path / attack.at)
    attack.make(folder)
    run_state_attack(attack, folder)


def test_the_params_attack_would_permute_state_in_torch():
    """The reference for the ``reserved-group-params`` rows: torch itself, given the hostile group, WOULD move
    state between parameters."""
    _, opt, _, _ = trained(seed=9, steps=3)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = list(reversed(sd["param_groups"][0]["params"]))
    expected_if_obeyed = sd["state"][sd["param_groups"][0]["params"][0]]["exp_avg"]
    assert not torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], expected_if_obeyed)


def test_a_hyperparameter_the_optimizer_lacks_is_dropped_with_strict_false(pristine, tmp_path):
    folder = copy_checkpoint(pristine("torch_adamw"), tmp_path / "ckpt")
    _hyper(1, "injected", True)(folder)
    _, opt, sched, acc = trained(seed=9, steps=3)
    report = load_state(folder, opt, sched, acc, strict=False)
    assert "injected" not in opt.param_groups[1]
    assert any("injected" in note for note in report.notes)


def test_symlink_inside_the_folder_is_followed(pristine, tmp_path):
    folder = copy_checkpoint(pristine("torch_adamw"), tmp_path / "ckpt")
    os.rename(folder / SCHED, folder / "real.json")
    os.symlink("real.json", folder / SCHED)
    _, opt, sched, acc = trained(seed=9, steps=3)
    assert load_state(folder, opt, sched, acc).scheduler_loaded


def test_save_over_a_hostile_checkpoint_overwrites_it(pristine, tmp_path):
    """Existing files with JSON nested 100k deep are not a checkpoint to preserve: the save replaces them."""
    folder = copy_checkpoint(pristine("sharded"), tmp_path / "ckpt")
    deep = "[" * 100_000 + "]" * 100_000
    (folder / OPTIMIZER_INDEX_NAME).write_text('{"metadata": ' + deep + ', "weight_map": {}}')
    (folder / SCHED).write_text(deep)
    _, opt, sched, acc = trained(seed=10, steps=2)
    save_state(folder, opt, sched, acc)
    _, opt2, sched2, acc2 = trained(seed=9, steps=3)
    assert has_state(folder) and load_state(folder, opt2, sched2, acc2).complete


def test_local_subfolder_cannot_leave_the_directory(pristine, tmp_path):
    copy_checkpoint(pristine("torch_adamw"), tmp_path / "outside")
    (tmp_path / "dir").mkdir()
    _, opt, sched, acc = trained(seed=9, steps=3)
    for load in (load_state, state.load_state):
        with pytest.raises(ValueError, match="subfolder"):
            load(tmp_path / "dir", opt, sched, acc, subfolder="../outside")


# --- hf-optim inspect on hostile metadata: one error line or a clean table, never a traceback or escapes ------

INSPECT_ATTACKS = {
    "non-string-info": (_meta(lambda m: m.update(info={"source": 7})), [], (2,)),
    "tuple-dictionary-keys": (_hyper(0, "betas", {"items": [[{"tuple": [1, 2]}, 0.5]]}), ["--json"], (0, 2)),
    "terminal-escapes": (
        _meta(
            lambda m: m.update(
                optimizer={"class": "\x1b]52;c;ZWNobyBwd25lZA==\x07torch.optim.adamw.AdamW", "name": None}
            )
        ),
        [],
        (0, 2),
    ),
}


def _inspect_every_row(root):
    save_checkpoint("torch_adamw", root / "pristine")
    jobs = []
    for name, (make, args, _) in INSPECT_ATTACKS.items():
        folder = copy_checkpoint(root / "pristine", root / name)
        make(folder)
        jobs.append({"cwd": str(root), "argv": ["inspect", *args, str(folder)]})
    results = run_batch(jobs, root, timeout=300)
    (root / "inspected.json").write_text(json.dumps(dict(zip(INSPECT_ATTACKS, results, strict=True))))


@pytest.fixture(scope="session")
def inspected(tmp_path_factory):
    """``hf-optim inspect`` run on every row, in one process, once per run: {id: result}."""
    root = once_per_run(tmp_path_factory, "inspect", _inspect_every_row)
    return json.loads((root / "inspected.json").read_text())


@pytest.mark.parametrize("row", INSPECT_ATTACKS, ids=INSPECT_ATTACKS)
def test_inspect_cli_on_hostile_metadata(inspected, row):
    result, codes = inspected[row], INSPECT_ATTACKS[row][2]
    assert result["code"] in codes, result["stderr"][-500:]
    assert "Traceback" not in result["stderr"], result["stderr"][-500:]
    assert "\x1b" not in result["stdout"] and "\x1b" not in result["stderr"]


def test_non_string_info_is_refused_by_inspect_state(pristine, tmp_path):
    folder = copy_checkpoint(pristine("torch_adamw"), tmp_path / "ckpt")
    INSPECT_ATTACKS["non-string-info"][0](folder)
    refuses(inspect_state, OPT)(folder)


# --- the JSON reader itself ------------------------------------------------------------------------------------


def test_depth_count_skips_escaped_quotes_and_brackets_in_strings():
    """The nesting count ignores brackets inside strings, including after a long run of escaped quotes, and
    still counts the brackets after the string: 64 levels parse, 65 are refused (json.loads is the reference
    for the accepted value)."""
    head = '{"a": "' + '\\"' * 100_000 + '[[[{{{", "b": '
    ok = head + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_json(ok, "x.json") == json.loads(ok)
    deep = head + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}"
    with pytest.raises(CheckpointError, match=r"x\.json: JSON nested too deeply"):
        parse_json(deep.encode(), "x.json")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32", "utf-8-sig"])
def test_json_bytes_must_be_utf8_without_bom(encoding):
    """json.loads guesses UTF-16 / UTF-32 and skips a UTF-8 BOM; the checkpoint format is UTF-8 only."""
    with pytest.raises(CheckpointError, match=r"x\.json is not UTF-8"):
        parse_json('{"a": [1]}'.encode(encoding), "x.json")
