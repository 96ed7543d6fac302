"""Learning-rate schedules: hand-computed tables, written-out formulas, bit-exact agreement with transformers 5.x,
JSON description / state_dict round trips, pickling, and argument errors."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import transformers.optimization as tfo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import LambdaLR
from transformers.trainer_utils import SchedulerType

import hf_optim


def make_optimizer(lr: float = 10.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def run(scheduler, optimizer, steps: int) -> list[float]:
    """The first group's learning rate at steps 0..steps (read from the optimizer, as the update would use it)."""
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


# ----------------------------------------------------------------------------------------------------------------
# Independent references: hand-computed tables (lr = 10)
# ----------------------------------------------------------------------------------------------------------------

HAND_TABLES = [
    ("get_constant_schedule", {}, [10.0] * 6),
    ("get_constant_schedule_with_warmup", {"num_warmup_steps": 4}, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0]),
    (
        "get_linear_schedule_with_warmup",
        {"num_warmup_steps": 2, "num_training_steps": 10},
        [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25, 0.0, 0.0, 0.0],
    ),
    (
        # half cosine over 4 steps: 10 * (1 + cos(pi * s / 4)) / 2; it rises again after the end (transformers does)
        "get_cosine_schedule_with_warmup",
        {"num_warmup_steps": 0, "num_training_steps": 4},
        [10.0, 8.535533905932738, 5.0, 1.4644660940672627, 0.0, 1.4644660940672616],
    ),
    (
        "get_cosine_with_hard_restarts_schedule_with_warmup",
        {"num_warmup_steps": 0, "num_training_steps": 4, "num_cycles": 2},
        [10.0, 5.0, 10.0, 5.0, 0.0, 0.0],
    ),
    (
        # 9 * (1 - (s - 2) / 4) ** 2 + 1 after 2 warmup steps, then lr_end = 1
        "get_polynomial_decay_schedule_with_warmup",
        {"num_warmup_steps": 2, "num_training_steps": 6, "lr_end": 1.0, "power": 2.0},
        [0.0, 5.0, 10.0, 6.0625, 3.25, 1.5625, 1.0, 1.0, 1.0],
    ),
    (
        # warmup 4, then 10 / sqrt(s / 4): s=9 -> 10/1.5, s=16 -> 5
        "get_inverse_sqrt_schedule",
        {"num_warmup_steps": 4},
        [
            0.0,
            2.5,
            5.0,
            7.5,
            10.0,
            10 / math.sqrt(1.25),
            10 / math.sqrt(1.5),
            10 / math.sqrt(1.75),
            10 / math.sqrt(2),
            10 / math.sqrt(2.25),
            10 / math.sqrt(2.5),
            10 / math.sqrt(2.75),
            10 / math.sqrt(3),
            10 / math.sqrt(3.25),
            10 / math.sqrt(3.5),
            10 / math.sqrt(3.75),
            5.0,
        ],
    ),
    (
        # half cosine from 10 to 2 over 4 steps: 2 + 8 * (1 + cos(pi * s / 4)) / 2
        "get_cosine_with_min_lr_schedule_with_warmup",
        {"num_warmup_steps": 0, "num_training_steps": 4, "min_lr": 2.0},
        [10.0, 8.82842712474619, 6.0, 3.1715728752538097, 2.0],
    ),
    (
        "get_cosine_with_min_lr_schedule_with_warmup",
        {"num_warmup_steps": 0, "num_training_steps": 4, "min_lr_rate": 0.2},
        [10.0, 8.82842712474619, 6.0, 3.1715728752538097, 2.0],
    ),
    (
        # warmup 2, stable 2, linear decay over 2, then min_lr_ratio (0)
        "get_wsd_schedule",
        {"num_warmup_steps": 2, "num_decay_steps": 2, "num_training_steps": 6, "decay_type": "linear"},
        [0.0, 5.0, 10.0, 10.0, 10.0, 5.0, 0.0, 0.0],
    ),
    (
        # same with the stable phase given directly and a floor of 10% of the lr; warmup starts at the floor
        "get_wsd_schedule",
        {
            "num_warmup_steps": 2,
            "num_decay_steps": 2,
            "num_stable_steps": 1,
            "decay_type": "linear",
            "min_lr_ratio": 0.1,
        },
        [1.0, 5.5, 10.0, 10.0, 5.5, 1.0, 1.0],
    ),
    (
        # 1-sqrt warmup / decay: 10 * (1 - sqrt(1 - s/4)) then 10 * (1 - sqrt(p)), p = (s - 4) / 4
        "get_wsd_schedule",
        {
            "num_warmup_steps": 4,
            "num_decay_steps": 4,
            "num_stable_steps": 0,
            "warmup_type": "1-sqrt",
            "decay_type": "1-sqrt",
        },
        [
            0.0,
            10 * (1 - math.sqrt(0.75)),
            10 * (1 - math.sqrt(0.5)),
            5.0,
            10.0,
            5.0,
            10 * (1 - math.sqrt(0.5)),
            10 * (1 - math.sqrt(0.75)),
            0.0,
        ],
    ),
    (
        # cosine warmup: 10 * (1 - cos(pi * s / 2)) / 2, then cosine decay (default) over 2 steps
        "get_wsd_schedule",
        {"num_warmup_steps": 2, "num_decay_steps": 2, "num_stable_steps": 0, "warmup_type": "cosine"},
        [0.0, 5.0, 10.0, 5.0, 0.0],
    ),
]


@pytest.mark.parametrize(("function", "kwargs", "expected"), HAND_TABLES, ids=[t[0] for t in HAND_TABLES])
def test_hand_computed_tables(function, kwargs, expected):
    optimizer = make_optimizer(10.0)
    scheduler = getattr(hf_optim, function)(optimizer, **kwargs)
    assert run(scheduler, optimizer, len(expected) - 1) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# Written-out formulas over longer runs (warmup W, training T, lr 1)


def _warm(s: int, w: int) -> float:
    return s / max(1, w)


FORMULAS = {
    "linear": lambda s, w, t: _warm(s, w) if s < w else max(0.0, (t - s) / max(1, t - w)),
    "cosine": lambda s, w, t: (
        _warm(s, w) if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, t - w)))
    ),
    "cosine_with_restarts_3": lambda s, w, t: (
        _warm(s, w)
        if s < w
        else (0.0 if (s - w) >= (t - w) else 0.5 * (1 + math.cos(math.pi * ((3 * (s - w) / (t - w)) % 1.0))))
    ),
    "polynomial_3": lambda s, w, t: (
        _warm(s, w) if s < w else (1e-3 if s > t else (1 - 1e-3) * (1 - (s - w) / (t - w)) ** 3 + 1e-3)
    ),
    "cosine_with_min_lr_0.1": lambda s, w, t: (
        _warm(s, w) if s < w else (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - w) / (t - w))))
    ),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize(("warmup", "total"), [(0, 40), (7, 40), (13, 100)])
def test_written_out_formulas(name, warmup, total):
    optimizer = make_optimizer(1.0)
    if name == "cosine_with_restarts_3":
        scheduler = hf_optim.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total, 3)
    elif name == "polynomial_3":
        scheduler = hf_optim.get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, 1e-3, 3.0)
    elif name == "cosine_with_min_lr_0.1":
        scheduler = hf_optim.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=0.1
        )
    else:
        scheduler = hf_optim.get_scheduler(name, optimizer, warmup, total)
    steps = total if name.startswith("cosine_with_min") else total + 10
    expected = [FORMULAS[name](s, warmup, total) for s in range(steps + 1)]
    assert run(scheduler, optimizer, steps) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Bit-exact agreement with transformers 5.x
# ----------------------------------------------------------------------------------------------------------------

TRANSFORMERS_CASES = [
    ("get_constant_schedule", (), {}),
    ("get_constant_schedule_with_warmup", (0,), {}),
    ("get_constant_schedule_with_warmup", (7,), {}),
    ("get_linear_schedule_with_warmup", (0, 50), {}),
    ("get_linear_schedule_with_warmup", (7, 50), {}),
    ("get_linear_schedule_with_warmup", (50, 50), {}),
    ("get_cosine_schedule_with_warmup", (7, 50), {}),
    ("get_cosine_schedule_with_warmup", (3, 61), {"num_cycles": 1.37}),
    ("get_cosine_schedule_with_warmup", (0, 0), {}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (7, 50), {}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (5, 97), {"num_cycles": 3}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (5, 97), {"num_cycles": 2.5}),
    ("get_polynomial_decay_schedule_with_warmup", (7, 50), {}),
    ("get_polynomial_decay_schedule_with_warmup", (0, 33), {"lr_end": 1e-3, "power": 2.0}),
    ("get_polynomial_decay_schedule_with_warmup", (4, 33), {"lr_end": 0.0, "power": 0.5}),
    ("get_inverse_sqrt_schedule", (0,), {}),
    ("get_inverse_sqrt_schedule", (7,), {}),
    ("get_inverse_sqrt_schedule", (7,), {"timescale": 20}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (7, 50), {"min_lr": 1e-3}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (7, 50), {"min_lr_rate": 0.05, "num_cycles": 0.75}),
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (7, 50), {"min_lr_rate": 0.1}),
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (7, 50), {"min_lr": 1e-3, "warmup_lr_rate": 0.2}),
    ("get_wsd_schedule", (7, 13), {"num_training_steps": 50}),
    ("get_wsd_schedule", (7, 13), {"num_stable_steps": 9, "warmup_type": "cosine", "decay_type": "linear"}),
    (
        "get_wsd_schedule",
        (5, 20),
        {"num_training_steps": 40, "warmup_type": "1-sqrt", "decay_type": "1-sqrt", "min_lr_ratio": 0.1},
    ),
    ("get_wsd_schedule", (5, 20), {"num_training_steps": 40, "decay_type": "cosine", "num_cycles": 0.3}),
]


# Boundaries: transformers' functions accept them and give finite values, so hf_optim must give the same values.
EDGE_CASES = [
    ("get_constant_schedule_with_warmup", (1,), {}),
    ("get_linear_schedule_with_warmup", (500, 3), {}),  # warmup_steps beyond max_steps: Trainer still trains
    ("get_linear_schedule_with_warmup", (3, 3), {}),
    ("get_linear_schedule_with_warmup", (0, 0), {}),
    ("get_linear_schedule_with_warmup", (5, 0), {}),
    ("get_cosine_schedule_with_warmup", (500, 3), {}),
    ("get_cosine_schedule_with_warmup", (10, 3), {"num_cycles": 2.0}),
    ("get_cosine_schedule_with_warmup", (2, 20), {"num_cycles": 0}),
    ("get_cosine_schedule_with_warmup", (2, 20), {"num_cycles": -0.5}),
    ("get_cosine_schedule_with_warmup", (2, 20), {"num_cycles": 1e-12}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (500, 3), {}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (0, 0), {}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (2, 20), {"num_cycles": 0}),
    ("get_cosine_with_hard_restarts_schedule_with_warmup", (2, 20), {"num_cycles": -1.5}),
    ("get_polynomial_decay_schedule_with_warmup", (10, 3), {}),  # decay phase never reached
    ("get_polynomial_decay_schedule_with_warmup", (10, 3), {"power": -1.0}),
    ("get_polynomial_decay_schedule_with_warmup", (2, 20), {"power": 0.0}),
    ("get_polynomial_decay_schedule_with_warmup", (2, 20), {"lr_end": -0.05}),
    ("get_polynomial_decay_schedule_with_warmup", (0, 1), {"lr_end": 0.0999}),
    ("get_inverse_sqrt_schedule", (7,), {"timescale": 1}),
    ("get_inverse_sqrt_schedule", (0,), {"timescale": 3}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (500, 3), {"min_lr": 1e-3}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (2, 20), {"min_lr": -0.01, "num_cycles": 0}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (2, 20), {"min_lr_rate": 1.5}),
    ("get_cosine_with_min_lr_schedule_with_warmup", (0, 0), {"min_lr_rate": 0.0}),
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (500, 3), {"min_lr_rate": 0.1}),
    (
        "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        (1, 10),
        {"min_lr_rate": 0.1, "warmup_lr_rate": 0.3},
    ),
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (0, 0), {"min_lr_rate": 0.1}),
    ("get_cosine_with_min_lr_schedule_with_warmup_lr_rate", (4, 10), {"min_lr": 0.0, "warmup_lr_rate": -0.2}),
    ("get_wsd_schedule", (6, 5), {"num_training_steps": 10}),  # negative stable phase
    ("get_wsd_schedule", (0, 0), {"num_training_steps": 0}),
    ("get_wsd_schedule", (500, 5), {"num_training_steps": 3}),
    ("get_wsd_schedule", (3, 5), {"num_stable_steps": 0, "min_lr_ratio": 1.0}),
    ("get_wsd_schedule", (3, 5), {"num_training_steps": 20, "num_cycles": 0, "min_lr_ratio": -0.1}),
]


@pytest.mark.parametrize(("function", "args", "kwargs"), TRANSFORMERS_CASES + EDGE_CASES)
def test_same_lrs_as_transformers(function, args, kwargs):
    ours_opt, theirs_opt = make_optimizer(0.1, groups=2), make_optimizer(0.1, groups=2)
    ours = getattr(hf_optim, function)(ours_opt, *args, **kwargs)
    theirs = getattr(tfo, function)(theirs_opt, *args, **kwargs)
    assert isinstance(ours, LambdaLR)
    for _ in range(80):
        assert ours.get_last_lr() == theirs.get_last_lr()  # exact, every group
        assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in theirs_opt.param_groups]
        ours_opt.step()
        theirs_opt.step()
        ours.step()
        theirs.step()


@settings(max_examples=60, deadline=None)
@given(
    warmup=st.integers(0, 30),
    total=st.integers(0, 60),
    cycles=st.floats(-4.0, 4.0, allow_nan=False),
    name=st.sampled_from(
        [
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "cosine_with_min_lr",
            "cosine_warmup_with_min_lr",
        ]
    ),
)
def test_get_scheduler_matches_transformers_get_scheduler(warmup, total, cycles, name):
    """Any step counts (warmup beyond training included) and any finite num_cycles give transformers' values."""
    specific = {
        "cosine": {"num_cycles": cycles},
        "cosine_with_restarts": {"num_cycles": cycles},
        "polynomial": {"power": abs(cycles)},
        "cosine_with_min_lr": {"num_cycles": cycles, "min_lr_rate": 0.1},
        "cosine_warmup_with_min_lr": {"num_cycles": cycles, "min_lr_rate": 0.1},
    }.get(name, {})
    if name == "polynomial" and warmup == total:
        # transformers divides by the zero-length decay phase at step `total`; hf_optim refuses up front
        with pytest.raises(ValueError, match="num_training_steps"):
            hf_optim.get_scheduler(name, make_optimizer(0.01), warmup, total, **specific)
        with pytest.raises(ZeroDivisionError):
            theirs_opt = make_optimizer(0.01)
            run(
                tfo.get_scheduler(name, theirs_opt, warmup, total, scheduler_specific_kwargs=specific),
                theirs_opt,
                total + 2,
            )
        return
    ours_opt, theirs_opt = make_optimizer(0.01), make_optimizer(0.01)
    ours = hf_optim.get_scheduler(
        SchedulerType(name), ours_opt, warmup, total, scheduler_specific_kwargs=specific
    )
    theirs = tfo.get_scheduler(name, theirs_opt, warmup, total, scheduler_specific_kwargs=specific)
    assert run(ours, ours_opt, max(total, warmup) + 5) == run(theirs, theirs_opt, max(total, warmup) + 5)


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "cosine",
        "cosine_with_restarts",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
    ],
)
def test_warmup_longer_than_training_by_name_matches_transformers(name):
    specific = {"min_lr_rate": 0.1} if name == "cosine_with_min_lr" else {}
    ours_opt, theirs_opt = make_optimizer(0.1), make_optimizer(0.1)
    ours = hf_optim.get_scheduler(name, ours_opt, 500, 3, **specific)
    theirs = tfo.get_scheduler(name, theirs_opt, 500, 3, scheduler_specific_kwargs=specific)
    assert run(ours, ours_opt, 10) == run(theirs, theirs_opt, 10)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay"])
def test_get_scheduler_ignores_step_counts_a_schedule_does_not_take(name):
    """Trainer always passes both counts; like transformers, schedules that don't use one ignore it."""
    specific = {"num_decay_steps": 10} if name == "warmup_stable_decay" else {}
    ours_opt, theirs_opt = make_optimizer(), make_optimizer()
    ours = hf_optim.get_scheduler(name, ours_opt, 5, 30, **specific)
    theirs = tfo.get_scheduler(name, theirs_opt, 5, 30, scheduler_specific_kwargs=specific)
    assert run(ours, ours_opt, 40) == run(theirs, theirs_opt, 40)


def test_builtin_registry_names_are_transformers_scheduler_types():
    for name in hf_optim.list_schedulers():
        assert SchedulerType(name).value == name


# ----------------------------------------------------------------------------------------------------------------
# Description, state_dict round trips, pickling
# ----------------------------------------------------------------------------------------------------------------

ALL_BY_NAME = [
    ("linear", {}),
    ("cosine", {"num_cycles": 0.7}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"lr_end": 1e-4, "power": 2.0}),
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("inverse_sqrt", {"timescale": 9}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-3}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "decay_type": "1-sqrt"}),
]


def test_every_builtin_schedule_is_covered_here():
    assert sorted(name for name, _ in ALL_BY_NAME) == hf_optim.list_schedulers()


def test_config_records_every_argument():
    scheduler = hf_optim.get_cosine_schedule_with_warmup(make_optimizer(), 3, 30)
    assert scheduler.hf_optim_config == {
        "name": "cosine",
        "kwargs": {"num_warmup_steps": 3, "num_training_steps": 30, "num_cycles": 0.5},
    }
    by_name = hf_optim.get_scheduler("cosine", make_optimizer(), num_warmup_steps=3, num_training_steps=30)
    assert by_name.hf_optim_config == scheduler.hf_optim_config
    wsd = hf_optim.get_scheduler("warmup_stable_decay", make_optimizer(), 2, 20, num_decay_steps=5)
    assert wsd.hf_optim_config == {
        "name": "warmup_stable_decay",
        "kwargs": {
            "num_warmup_steps": 2,
            "num_decay_steps": 5,
            "num_training_steps": 20,
            "num_stable_steps": None,
            "warmup_type": "linear",
            "decay_type": "cosine",
            "min_lr_ratio": 0,
            "num_cycles": 0.5,
            "warmup_from_zero": False,
        },
    }


@pytest.mark.parametrize(("name", "kwargs"), ALL_BY_NAME, ids=[n for n, _ in ALL_BY_NAME])
def test_resume_mid_schedule_from_json(name, kwargs):
    total, cut = 30, 11
    reference_opt = make_optimizer(0.01, groups=2)
    reference = hf_optim.get_scheduler(name, reference_opt, 4, total, **kwargs)
    expected = run(reference, reference_opt, total + 3)

    opt = make_optimizer(0.01, groups=2)
    scheduler = hf_optim.get_scheduler(name, opt, 4, total, **kwargs)
    head = run(scheduler, opt, cut)
    saved = json.dumps({"config": scheduler.hf_optim_config, "state": scheduler.state_dict()})

    # a new process: a fresh optimizer (its lr is the configured one, not the scheduled one), rebuilt from JSON
    loaded = json.loads(saved)
    opt2 = make_optimizer(0.01, groups=2)
    rebuilt = hf_optim.scheduler_from_config(opt2, loaded["config"])
    rebuilt.load_state_dict(loaded["state"])
    for group, lr in zip(opt2.param_groups, rebuilt.get_last_lr(), strict=True):
        group["lr"] = lr  # the optimizer's state_dict would carry this; here only the scheduler is restored
    tail = run(rebuilt, opt2, total + 3 - cut)
    assert head + tail[1:] == expected
    assert rebuilt.hf_optim_config == scheduler.hf_optim_config


@pytest.mark.parametrize(("name", "kwargs"), ALL_BY_NAME, ids=[n for n, _ in ALL_BY_NAME])
def test_pickle_round_trip(name, kwargs):
    opt = make_optimizer(0.01)
    scheduler = hf_optim.get_scheduler(name, opt, 4, 30, **kwargs)
    run(scheduler, opt, 6)
    clone = pickle.loads(pickle.dumps(scheduler))
    assert clone.hf_optim_config == scheduler.hf_optim_config
    assert run(clone, clone.optimizer, 20) == run(scheduler, opt, 20)


def test_state_dict_is_json_and_plain():
    scheduler = hf_optim.get_linear_schedule_with_warmup(make_optimizer(), 2, 10)
    state = json.loads(json.dumps(scheduler.state_dict(), allow_nan=False))
    assert state["last_epoch"] == 0
    assert state["hf_optim_config"]["name"] == "linear"


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda o: hf_optim.get_linear_schedule_with_warmup(o, -1, 10), "num_warmup_steps"),
        (lambda o: hf_optim.get_linear_schedule_with_warmup(o, 1, -10), "num_training_steps"),
        (lambda o: hf_optim.get_linear_schedule_with_warmup(o, 1.5, 10), "num_warmup_steps"),
        (lambda o: hf_optim.get_linear_schedule_with_warmup(o, True, 10), "num_warmup_steps"),
        (lambda o: hf_optim.get_constant_schedule_with_warmup(o, -3), "num_warmup_steps"),
        (lambda o: hf_optim.get_cosine_schedule_with_warmup(o, 1, 10, num_cycles=math.nan), "num_cycles"),
        (lambda o: hf_optim.get_cosine_schedule_with_warmup(o, 1, 10, num_cycles=math.inf), "num_cycles"),
        (
            lambda o: hf_optim.get_cosine_with_min_lr_schedule_with_warmup(o, 1, 10, math.nan, min_lr=0.1),
            "num_cycles",
        ),
        (
            lambda o: hf_optim.get_cosine_with_min_lr_schedule_with_warmup(
                make_optimizer(0.0), 1, 10, min_lr=0.1
            ),
            "min_lr",
        ),
        (lambda o: hf_optim.get_polynomial_decay_schedule_with_warmup(o, 0, 0), "num_training_steps"),
        (
            lambda o: hf_optim.get_polynomial_decay_schedule_with_warmup(
                make_optimizer(0.0), 1, 10, lr_end=-1.0
            ),
            "lr",
        ),
        (lambda o: hf_optim.get_inverse_sqrt_schedule(o, 0, timescale=-3), "timescale"),
        (lambda o: hf_optim.get_wsd_schedule(o, 1, 5, 10, min_lr_ratio=math.nan), "min_lr_ratio"),
        (lambda o: hf_optim.get_cosine_with_min_lr_schedule_with_warmup(o, 1, 10), "min_lr"),
        (
            lambda o: hf_optim.get_cosine_with_min_lr_schedule_with_warmup(
                o, 1, 10, min_lr=1, min_lr_rate=0.1
            ),
            "min_lr",
        ),
        (lambda o: hf_optim.get_polynomial_decay_schedule_with_warmup(o, 1, 10, lr_end=20.0), "lr_end"),
        (lambda o: hf_optim.get_polynomial_decay_schedule_with_warmup(o, 10, 10), "num_training_steps"),
        (lambda o: hf_optim.get_polynomial_decay_schedule_with_warmup(o, 1, 10, power=-1), "power"),
        (lambda o: hf_optim.get_inverse_sqrt_schedule(o, 0, timescale=0), "timescale"),
        (lambda o: hf_optim.get_wsd_schedule(o, 1, 5), "num_training_steps"),
        (lambda o: hf_optim.get_wsd_schedule(o, 1, 5, 10, warmup_type="exp"), "warmup_type"),
        (lambda o: hf_optim.get_wsd_schedule(o, 1, 5, 10, decay_type="step"), "decay_type"),
        (lambda o: hf_optim.get_wsd_schedule(o, 1, -5, 10), "num_decay_steps"),
        (lambda o: hf_optim.get_scheduler("linear", o, num_warmup_steps=2), "num_training_steps"),
        (lambda o: hf_optim.get_scheduler("cosine", o, num_training_steps=20), "num_warmup_steps"),
        (lambda o: hf_optim.get_scheduler("warmup_stable_decay", o, 2, 20), "num_decay_steps"),
        (lambda o: hf_optim.get_scheduler("linear", o, 2, 20, num_cycles=2), "num_cycles"),
        (lambda o: hf_optim.get_scheduler("constant", o, 2, 20, min_lr=0.1), "min_lr"),
        (lambda o: hf_optim.get_scheduler("linear", o, 2, 20, {"power": 1}, power=2), "power"),
        (lambda o: hf_optim.get_scheduler(3, o, 2, 20), "name"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    optimizer = make_optimizer(1.0)
    before = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match=argument):
        call(optimizer)
    assert [
        dict(g) for g in optimizer.param_groups
    ] == before  # validation happens before LambdaLR touches it


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'cosine_with_restarts'") as err:
        hf_optim.get_scheduler("cosine_with_restart", make_optimizer(), 1, 10)
    assert "linear" in str(err.value)  # lists what is registered
    with pytest.raises(ValueError, match="reduce_lr_on_plateau"):
        hf_optim.get_scheduler(SchedulerType.REDUCE_ON_PLATEAU, make_optimizer())


@pytest.mark.parametrize(
    "config", [None, {"kwargs": {}}, {"name": 3}, {"name": "linear", "kwargs": [1, 2]}, "linear"]
)
def test_scheduler_from_config_rejects_malformed(config):
    with pytest.raises(TypeError, match="config"):
        hf_optim.scheduler_from_config(make_optimizer(), config)


def test_scheduler_from_config_with_last_epoch_resumes_from_initial_lr():
    opt = make_optimizer(1.0)
    scheduler = hf_optim.get_linear_schedule_with_warmup(opt, 2, 10)
    run(scheduler, opt, 5)
    # LambdaLR with last_epoch >= 0 reads 'initial_lr' from the groups (set by the first scheduler)
    rebuilt = hf_optim.scheduler_from_config(opt, scheduler.hf_optim_config, last_epoch=5)
    assert rebuilt.last_epoch == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # (10 - 6) / 8


def _wsd_transformers_4_44(step, *, warmup, stable, decay, min_lr_ratio=0.0, num_cycles=0.5):
    """transformers 4.44's ``_get_wsd_scheduler_lambda``, written out (its warmup starts at 0)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        value = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
        return (1.0 - min_lr_ratio) * value + min_lr_ratio
    return min_lr_ratio


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 0.5])
def test_wsd_warmup_from_zero_equals_transformers_4x(min_lr_ratio):
    opt = make_optimizer()
    sched = hf_optim.get_wsd_schedule(
        opt, 4, 5, num_stable_steps=3, min_lr_ratio=min_lr_ratio, warmup_from_zero=True
    )
    got = [sched.lr_lambdas[0](t) for t in range(15)]
    assert got == [
        _wsd_transformers_4_44(t, warmup=4, stable=3, decay=5, min_lr_ratio=min_lr_ratio) for t in range(15)
    ]
    rebuilt = hf_optim.scheduler_from_config(make_optimizer(), sched.hf_optim_config)
    assert [rebuilt.lr_lambdas[0](t) for t in range(15)] == got
    if min_lr_ratio:  # the default (transformers 5.x) warmup starts at min_lr_ratio instead
        default = hf_optim.get_wsd_schedule(
            make_optimizer(), 4, 5, num_stable_steps=3, min_lr_ratio=min_lr_ratio
        )
        assert default.lr_lambdas[0](0) == min_lr_ratio != got[0] == 0.0


def test_wsd_warmup_from_zero_is_a_linear_warmup_only():
    with pytest.raises(ValueError, match="warmup_type must be 'linear'"):
        hf_optim.get_wsd_schedule(make_optimizer(), 4, 5, 20, warmup_type="cosine", warmup_from_zero=True)
    with pytest.raises(TypeError, match="warmup_from_zero must be a bool"):
        hf_optim.get_wsd_schedule(make_optimizer(), 4, 5, 20, warmup_from_zero="yes")
