"""``hf-optim convert`` of hostile pickled files, run through the command line.

Every row of the attack table is a small ``optimizer.pt`` (or ``scheduler.pt``) that ``torch.load(weights_only=True)``
may well accept; each must give one error line naming the file, exit code 2, no traceback, nothing written and no
code run. The rows that would grow on conversion (a view repeating its storage, a graph of shared lists) must also
fail fast: all rows run as command lines of one subprocess (tests/security/cli_batch.py) whose deadline is far below
what unfolding them would take.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.run_cache import once_per_run
from tests.security import deepspeed_files as ds
from tests.security.cli_batch import run_batch

LEGACY_MODULE = "pytorch_pretrained_bert.optimization"


def _adam(state, **group):
    return {"state": state, "param_groups": [{"params": sorted(state) or [0], "lr": 0.1, **group}]}


def _moments(exp_avg, exp_avg_sq):
    return _adam({0: {"step": torch.tensor(1.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}})


def _nested(depth):
    out = cur = []
    for _ in range(depth):
        cur.append([])
        cur = cur[0]
    return out


def _shared_lists(depth):
    """34 levels of ``x = [x, x]``: a few hundred bytes pickled, 2**depth lists unfolded."""
    x: list = []
    for _ in range(depth):
        x = [x, x]
    return x


def _save_deep(path, depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth + 1000))  # torch.save pickles recursively
    try:
        torch.save(_adam({}, x=_nested(depth)), path)
    finally:
        sys.setrecursionlimit(limit)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _legacy_schedule_with_type(path):
    """A pickled pytorch-pretrained-bert ``WarmupLinearSchedule`` whose ``__dict__`` says ``type: ConstantLR``."""
    module = types.ModuleType(LEGACY_MODULE)

    class WarmupLinearSchedule:
        pass

    WarmupLinearSchedule.__module__ = LEGACY_MODULE
    WarmupLinearSchedule.__qualname__ = "WarmupLinearSchedule"
    module.WarmupLinearSchedule = WarmupLinearSchedule
    schedule = WarmupLinearSchedule()
    schedule.__dict__.update(
        {"type": "ConstantLR", "warmup": 0.1, "t_total": 100, "warned_for_t_total_at_progress": -1}
    )
    group = {"params": [0], "lr": 0.1, "schedule": schedule, "b1": 0.9, "b2": 0.999, "e": 1e-6}
    group.update(weight_decay=0.01, max_grad_norm=1.0)
    saved = {name: sys.modules.get(name) for name in ("pytorch_pretrained_bert", LEGACY_MODULE)}
    sys.modules["pytorch_pretrained_bert"] = types.ModuleType("pytorch_pretrained_bert")
    sys.modules[LEGACY_MODULE] = module
    try:
        torch.save({"state": {}, "param_groups": [group]}, path)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def _scheduler(path, state):
    torch.save(_adam({}), path)
    torch.save(state, path.with_name("scheduler.pt"))


ATTACKS = {
    # not an optimizer state dict
    "garbage-pickle": lambda p: p.write_bytes(b"\x80\x04garbage"),
    "code": lambda p: p.write_bytes(pickle.dumps(_Boom())),
    "list": lambda p: torch.save([1, 2, 3], p),
    "params-str": lambda p: torch.save({"state": {0: {"exp_avg": 1}}, "param_groups": [{"params": "x"}]}, p),
    "orphan-state": lambda p: torch.save({"state": {5: {}}, "param_groups": [{"params": [0]}]}, p),
    "repeated-index": lambda p: torch.save({"state": {}, "param_groups": [{"params": [0, 0]}]}, p),
    # structures the format cannot hold
    "int-state-key": lambda p: torch.save(_adam({0: {5: torch.tensor(1.0)}}), p),
    "reserved-group-key": lambda p: torch.save(
        {"state": {}, "param_groups": [{"params": [0], "state": 1}]}, p
    ),
    "reserved-top-level-key": lambda p: torch.save({**_adam({}), "param_names": 3}, p),
    "set-value": lambda p: torch.save(_adam({0: {"exp_avg": {1, 2}}}), p),
    # nested deeper than a reader accepts: refused, not written as a checkpoint no one can load
    "nested-100": lambda p: _save_deep(p, 100),
    "nested-3000": lambda p: _save_deep(p, 3000),
    # output proportional to the stored data
    "stride-0-moments": lambda p: torch.save(
        _moments(torch.zeros(1).expand(50_000_000), torch.zeros(1).expand(50_000_000)), p
    ),
    "overlapping-strides": lambda p: torch.save(
        _moments(torch.zeros(2000).as_strided((1000, 1000), (1, 1)), torch.zeros(1000, 1000)), p
    ),
    "shared-storage": lambda p: (lambda t: torch.save(_moments(t, t[:]), p))(torch.zeros(1000)),
    "shared-lists-in-group": lambda p: torch.save(_adam({}, x=_shared_lists(34)), p),
    "shared-lists-in-scheduler": lambda p: _scheduler(p, {"last_epoch": 1, "x": _shared_lists(34)}),
    # a pickled legacy schedule may not pick its own class
    "legacy-schedule-carrying-type": _legacy_schedule_with_type,
}


def _names_from_a_non_model_class(path):
    """``--names-from DIR`` whose ``config.json`` names ``architectures[0] = "is_torch_available"``: only model
    classes may be built."""
    torch.save({"state": {}, "param_groups": [{"params": [0, 1], "lr": 0.1}]}, path)
    config = {
        "model_type": "bert",
        "architectures": ["is_torch_available"],
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "vocab_size": 10,
    }
    (path.parent / "config.json").write_text(json.dumps(config))


# id -> (how optimizer.pt is made, extra command-line arguments given the folder, what the error line names)
TABLE = {name: (make, lambda d: [], None) for name, make in ATTACKS.items()}
if importlib.util.find_spec("transformers") is not None:
    TABLE["names-from-a-non-model-class"] = (
        _names_from_a_non_model_class,
        lambda d: ["--names-from", str(d)],
        "config.json",
    )


def _deepspeed(change_rank=None, rank=1, *, model=None, protocol=None, after=None):
    """A make for a stock DeepSpeed ZeRO-2 checkpoint (tests/security/deepspeed_files.py) in the row's folder,
    with ``change_rank(content)`` applied to rank ``rank``'s optimizer states, or ``model`` as its model states."""

    def make(path):
        folder = path.parent
        ranks = {}
        if change_rank is not None:
            content = ds.optim_states(rank)
            change_rank(content["optimizer_state_dict"])
            ranks[rank] = content
        ds.write_checkpoint(folder, model=model, ranks=ranks)
        if protocol is not None:  # rewritten with another pickle protocol
            target = ds.optim_file(folder, rank)
            with ds.deepspeed_names():
                torch.save(ds.optim_states(rank), target, pickle_protocol=protocol)
        if after is not None:
            after(folder)

    return make


def _base(osd):
    return osd["base_optimizer_state"]["state"][0]


def _link_outside(folder):
    outside = folder.parent / f"{folder.name}-outside.pt"
    ds.optim_file(folder, 1).rename(outside)
    ds.optim_file(folder, 1).symlink_to(outside)


def _deflated(folder):
    """Rank 1's archive rewritten with its entries compressed (torch.save stores them): a zip bomb's shape."""
    path = ds.optim_file(folder, 1)
    with zipfile.ZipFile(path) as src:
        entries = [(name, src.read(name)) for name in src.namelist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, data in entries:
            out.writestr(name, data)


def _hard_link_of_rank_0(folder):
    ds.optim_file(folder, 1).unlink()
    os.link(ds.optim_file(folder, 0), ds.optim_file(folder, 1))


def _tag_folder_outside(folder):
    outside = folder.parent / f"{folder.name}-elsewhere"
    (folder / ds.TAG).rename(outside)
    (folder / ds.TAG).symlink_to(outside, target_is_directory=True)


def _latest_outside(folder):
    secret = folder.parent / f"{folder.name}-secret.txt"
    secret.write_text("sk-live-do-not-show")
    (folder / "latest").unlink()
    (folder / "latest").symlink_to(secret)


def _shadowed_items(osd):
    """``base_optimizer_state['state']``: an ``OrderedDict`` whose ``items`` the pickle replaced, so that a walk
    through ``.items()`` would see nothing in it."""
    state = collections.OrderedDict(osd["base_optimizer_state"]["state"])
    state.items = collections.OrderedDict
    osd["base_optimizer_state"]["state"] = state


def _big_param_shapes():
    model = ds.model_states()
    model["param_shapes"][0]["a.weight"] = torch.Size([300, 2])
    return model


RANK0, RANK1 = (f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2))
DEEPSPEED_ATTACKS = {
    # no pickled code runs, and no type DeepSpeed does not write is built
    "deepspeed-code-as-loss-scaler": (_deepspeed(lambda o: o.update(loss_scaler=_Boom())), RANK1),
    "deepspeed-foreign-class": (_deepspeed(lambda o: o.update(overflow=collections.Counter())), RANK1),
    "deepspeed-protocol-4-pickle": (_deepspeed(protocol=4, rank=0), RANK0),
    "deepspeed-compressed-pickle": (_deepspeed(after=_deflated), RANK1),
    "deepspeed-ordered-dict-with-its-items-replaced": (_deepspeed(_shadowed_items), RANK1),
    "deepspeed-loss-scaler-holding-a-tensor": (
        _deepspeed(lambda o: vars(o["loss_scaler"]).update(cur_scale=torch.ones(3))),
        RANK1,
    ),
    # output proportional to the stored data
    "deepspeed-stride-0-moments": (
        _deepspeed(
            lambda o: _base(o).update(
                exp_avg=torch.zeros(1).expand(50_000_000), exp_avg_sq=torch.zeros(1).expand(50_000_000)
            )
        ),
        RANK1,
    ),
    "deepspeed-one-file-as-two-ranks": (_deepspeed(after=_hard_link_of_rank_0), RANK1),
    "deepspeed-list-as-a-state-value": (
        _deepspeed(lambda o: _base(o).update(history=list(range(5000))), rank=0),
        RANK0,
    ),
    "deepspeed-shared-storage": (
        _deepspeed(lambda o: _base(o).update(exp_avg_sq=_base(o)["exp_avg"][:])),
        RANK1,
    ),
    # partitions that do not belong together, or a layout the shapes do not describe
    "deepspeed-partition-count": (_deepspeed(lambda o: o.update(partition_count=[3])), RANK1),
    "deepspeed-other-stage": (_deepspeed(lambda o: o.update(zero_stage=ds.ZeroStageEnum.weights)), RANK1),
    "deepspeed-other-partition-size": (
        _deepspeed(lambda o: _base(o).update(exp_avg=torch.zeros(7), exp_avg_sq=torch.zeros(7))),
        RANK1,
    ),
    "deepspeed-missing-rank": (_deepspeed(after=lambda f: ds.optim_file(f, 1).unlink()), RANK0),
    "deepspeed-shapes-larger-than-partitions": (_deepspeed(model=_big_param_shapes()), RANK0),
    "deepspeed-slice-mappings-disagree": (
        _deepspeed(lambda o: setattr(o["param_slice_mappings"][0]["a.weight"], "start", 1), rank=0),
        RANK0,
    ),
    "deepspeed-nan-step": (
        _deepspeed(lambda o: _base(o).update(step=torch.tensor(float("nan")))),
        "global_step2",
    ),
    "deepspeed-parameter-alignment-padding": (
        _deepspeed(lambda o: o.update(param_alignment_paddings=[[0, 2, 0, 0]]), rank=0),
        RANK0,
    ),
    "deepspeed-integer-moments": (
        _deepspeed(lambda o: _base(o).update(exp_avg=torch.zeros(6, dtype=torch.int64))),
        RANK1,
    ),
    "deepspeed-tensor-hyperparameter": (
        _deepspeed(lambda o: o["base_optimizer_state"]["param_groups"][0].update(lr=torch.ones(4)), rank=0),
        RANK0,
    ),
    "deepspeed-scheduler-with-code": (
        _deepspeed(after=lambda f: (f / "scheduler.pt").write_bytes(pickle.dumps(_Boom()))),
        "scheduler.pt",
    ),
    # nothing read reaches outside the folder
    "deepspeed-latest-outside": (
        _deepspeed(after=lambda f: (f / "latest").write_text("../elsewhere")),
        "latest",
    ),
    "deepspeed-link-outside": (_deepspeed(after=_link_outside), RANK1),
    "deepspeed-tag-folder-is-a-link-outside": (_deepspeed(after=_tag_folder_outside), "global_step2"),
    "deepspeed-latest-is-a-link-outside": (_deepspeed(after=_latest_outside), "latest"),
}
TABLE.update({name: (make, lambda d: [], names) for name, (make, names) in DEEPSPEED_ATTACKS.items()})


def _view_of_a_larger_storage(path):
    big = torch.arange(12.0)
    torch.save(_moments(big[:4].clone(), big[4:8]), path)


def _convert_every_row(root):
    rows = {
        **{k: (make, args) for k, (make, args, _) in TABLE.items()},
        "control": (_view_of_a_larger_storage, lambda d: []),
        "deepspeed-control": (_deepspeed(), lambda d: []),
    }
    jobs, folders = [], {}
    for i, (name, (make, args)) in enumerate(rows.items()):
        folder = root / f"row{i}"
        folder.mkdir()
        make(folder / "optimizer.pt")
        folders[name] = (str(folder), sorted(os.listdir(folder)))
        jobs.append({"cwd": str(folder), "argv": ["convert", str(folder), *args(folder)]})
    results = run_batch(jobs, root, timeout=300)
    done = {name: (*folders[name], result) for name, result in zip(rows, results, strict=True)}
    (root / "converted.json").write_text(json.dumps(done))


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Every row (and the control) converted by one process, once per run: {id: (folder, files before, result)}."""
    root = once_per_run(tmp_path_factory, "convert", _convert_every_row)
    done = json.loads((root / "converted.json").read_text())
    return {name: (Path(folder), before, result) for name, (folder, before, result) in done.items()}


@pytest.mark.parametrize("row", TABLE, ids=TABLE)
def test_hostile_file_is_one_error_line(converted, row):
    folder, before, result = converted[row]
    names = TABLE[row][2] or str(folder)
    assert "Traceback" not in result["stderr"], result["stderr"][-800:]
    assert result["code"] == 2, result["stderr"][-800:]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, result["stderr"]
    assert names in lines[0], lines[0]
    assert sorted(os.listdir(folder)) == before
    assert not (folder / "PWNED").exists()


def test_a_moment_viewing_part_of_a_larger_storage_converts(converted):
    """A view smaller than its storage (torch.save keeps the whole storage) is no attack: it converts, at the
    view's size."""
    folder, _, result = converted["control"]
    assert result["code"] == 0, result["stderr"][-800:]
    tensors = load_file(folder / "optimizer.safetensors")
    (sq,) = (v for k, v in tensors.items() if k.endswith("exp_avg_sq"))
    assert torch.equal(sq, torch.arange(4.0, 8.0))


def test_a_stock_deepspeed_checkpoint_converts_to_the_elements_deepspeeds_layout_gives(converted):
    """The control of the DeepSpeed rows: the same ZeRO-2 files, unchanged, convert; each parameter's state is
    its slice of the flat buffer written out in tests/security/deepspeed_files.py, loaded into a plain AdamW."""
    import hf_optim

    folder, _, result = converted["deepspeed-control"]
    assert result["code"] == 0, result["stderr"][-800:]
    weights = load_file(folder / "model.safetensors")
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in ds.SHAPES.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=0.5)
    hf_optim.load_state(folder, opt, model=_Named(params))
    for name, p in params.items():
        assert torch.equal(weights[name], ds.expected(name, "fp32")), name
        assert torch.equal(opt.state[p]["exp_avg"], ds.expected(name, "exp_avg")), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], ds.expected(name, "exp_avg_sq")), name
        assert opt.state[p]["step"].item() == 2.0
    assert opt.param_groups[0]["lr"] == 0.01


class _Named(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.a = torch.nn.Module()
        for name, p in params.items():
            self.a.register_parameter(name.split(".")[1], p)
