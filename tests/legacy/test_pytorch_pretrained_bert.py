"""hf_optim.legacy.pytorch_pretrained_bert's schedules against the real pytorch-pretrained-bert 0.6.2 ones."""

import logging

import pytest

from hf_optim.legacy import pytorch_pretrained_bert as ours
from tests.legacy.harness import LEGACY

# (class name, constructor kwargs): one row per schedule configuration
ROWS = [
    ("ConstantLR", {}),
    ("ConstantLR", {"warmup": 0.1, "t_total": 10}),
    ("WarmupLinearSchedule", {"warmup": 0.1, "t_total": 10}),
    ("WarmupLinearSchedule", {"warmup": 0.0, "t_total": 7}),
    ("WarmupLinearSchedule", {"warmup": -1, "t_total": 13}),
    ("WarmupLinearSchedule", {"warmup": 0.25, "t_total": -1}),
    ("WarmupConstantSchedule", {"warmup": 0.3, "t_total": 11}),
    ("WarmupCosineSchedule", {"warmup": 0.1, "t_total": 20}),
    ("WarmupCosineSchedule", {"warmup": 0.2, "t_total": 9, "cycles": 1.5}),
    ("WarmupCosineWithHardRestartsSchedule", {"warmup": 0.1, "t_total": 20, "cycles": 3.0}),
    ("WarmupCosineWithHardRestartsSchedule", {"warmup": 0.0, "t_total": 10}),
    ("WarmupCosineWithWarmupRestartsSchedule", {"warmup": 0.05, "t_total": 30, "cycles": 4.0}),
    ("WarmupCosineWithWarmupRestartsSchedule", {"warmup": -1, "t_total": 30, "cycles": 2.0}),
]
IDS = [f"{name}-{kw}" for name, kw in ROWS]


def outcome(fn, *args):
    """The value, or the exception type (negative progress with warmup 0 divides by zero in both)."""
    try:
        return fn(*args)
    except Exception as err:
        return type(err)


@pytest.mark.parametrize(("name", "kwargs"), ROWS, ids=IDS)
def test_every_step_equals_legacy(name, kwargs):
    legacy, new = getattr(LEGACY, name)(**kwargs), getattr(ours, name)(**kwargs)
    t_total = int(kwargs.get("t_total", 10))
    for step in range(0, 2 * max(t_total, 10) + 3):  # through and past t_total
        assert new.get_lr(step) == legacy.get_lr(step), step
        assert new.get_lr(step + 0.5) == legacy.get_lr(step + 0.5), step
    for i in range(-5, 260):
        progress = i / 97
        assert outcome(new.get_lr_, progress) == outcome(legacy.get_lr_, progress), progress
    assert vars(new) == vars(legacy)


@pytest.mark.parametrize("key", [None, "none", "warmup_cosine", "warmup_constant", "warmup_linear"])
@pytest.mark.parametrize(("warmup", "t_total"), [(0.1, 10), (-1, 25), (0.5, -1)])
def test_schedules_by_name_equal_legacy(key, warmup, t_total):
    assert set(ours.SCHEDULES) == set(LEGACY.SCHEDULES)
    legacy = LEGACY.SCHEDULES[key](warmup=warmup, t_total=t_total)
    new = ours.SCHEDULES[key](warmup=warmup, t_total=t_total)
    assert type(new).__name__ == type(legacy).__name__
    for step in range(40):
        assert new.get_lr(step) == legacy.get_lr(step)


@pytest.mark.parametrize(("name", "kwargs"), ROWS, ids=IDS)
def test_warnings_equal_legacy(name, kwargs, caplog):
    def messages(ns):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            schedule = getattr(ns, name)(**kwargs)
            for step in [*range(30), 5, 29, 31, 31, 40]:
                schedule.get_lr(step)
            schedule.get_lr(100, nowarn=True)
        return [r.getMessage() for r in caplog.records], [r.name for r in caplog.records]

    legacy, _ = messages(LEGACY)
    new, loggers = messages(ours)
    assert new == legacy
    assert all(n.startswith("hf_optim.") for n in loggers)


def test_a_warning_past_t_total_is_logged():
    schedule = ours.WarmupLinearSchedule(warmup=0.1, t_total=10)
    schedule.get_lr(12)
    assert schedule.warned_for_t_total_at_progress == 1.2


@pytest.mark.parametrize("warmup", [1.0, -0.5, 2.0, -2])
@pytest.mark.parametrize("name", ["ConstantLR", "WarmupLinearSchedule", "WarmupCosineSchedule"])
def test_bad_warmup_raises_like_legacy(name, warmup):
    with pytest.raises(ValueError, match="Invalid warmup"):
        getattr(LEGACY, name)(warmup=warmup, t_total=10)
    with pytest.raises(ValueError, match="Invalid warmup"):
        getattr(ours, name)(warmup=warmup, t_total=10)


def test_hard_restarts_need_at_least_one_cycle():
    with pytest.raises(AssertionError):
        LEGACY.WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=10, cycles=0.5)
    with pytest.raises(ValueError, match="cycles"):
        ours.WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=10, cycles=0.5)


def test_warmup_restarts_need_warmup_times_cycles_below_one():
    with pytest.raises(AssertionError):
        LEGACY.WarmupCosineWithWarmupRestartsSchedule(warmup=0.5, t_total=10, cycles=2.0)
    with pytest.raises(ValueError, match="cycles"):
        ours.WarmupCosineWithWarmupRestartsSchedule(warmup=0.5, t_total=10, cycles=2.0)


def test_base_class_is_abstract_and_has_its_legacy_name():
    assert ours._LRSchedule is ours.LRSchedule
    with pytest.raises(TypeError):
        ours._LRSchedule()


@pytest.mark.parametrize(("name", "kwargs"), ROWS, ids=IDS)
def test_json_form_rebuilds_the_same_schedule(name, kwargs):
    schedule = getattr(ours, name)(**kwargs)
    schedule.get_lr(35)  # moves the warning position where it applies
    data = schedule.to_json_dict()
    assert data["type"] == name
    rebuilt = ours.LRSchedule.from_json_dict(data)
    assert type(rebuilt) is type(schedule) and vars(rebuilt) == vars(schedule)
    for step in range(40):
        assert rebuilt.get_lr(step, nowarn=True) == schedule.get_lr(step, nowarn=True)


@pytest.mark.parametrize(
    "data",
    [
        {"type": "os.system", "warmup": 0.1, "t_total": 10.0, "warned_for_t_total_at_progress": -1.0},
        {"type": "WarmupLinearSchedule", "warmup": "0.1", "t_total": 10.0, "warned_for_t_total_at_progress": -1},
        {"type": "WarmupLinearSchedule", "warmup": 0.1, "t_total": 10.0},
        {"type": "WarmupLinearSchedule", "warmup": 0.1, "t_total": 10.0, "warned_for_t_total_at_progress": -1,
         "get_lr_": 1},
        {"type": "WarmupLinearSchedule", "warmup": 1.5, "t_total": 10.0, "warned_for_t_total_at_progress": -1},
        {"type": "WarmupCosineSchedule", "warmup": 0.1, "t_total": float("nan"),
         "warned_for_t_total_at_progress": -1, "cycles": 0.5},
        ["WarmupLinearSchedule"],
        # values each constructor refuses: t_total 0 (divides by it), cycles < 1 with restarts, a warmup of a
        # whole cycle or more (the stored warmup of the warmup-restarts schedule is warmup * cycles), infinities
        {"type": "WarmupLinearSchedule", "warmup": 0.1, "t_total": 0.0, "warned_for_t_total_at_progress": -1},
        {"type": "WarmupCosineWithHardRestartsSchedule", "warmup": 0.1, "t_total": 10.0,
         "warned_for_t_total_at_progress": -1, "cycles": 0.5},
        {"type": "WarmupCosineWithWarmupRestartsSchedule", "warmup": 1.0, "t_total": 10.0,
         "warned_for_t_total_at_progress": -1, "cycles": 2.0},
        {"type": "WarmupCosineSchedule", "warmup": 0.1, "t_total": 10.0,
         "warned_for_t_total_at_progress": -1, "cycles": float("inf")},
        {"type": "WarmupLinearSchedule", "warmup": -1.0, "t_total": 10.0, "warned_for_t_total_at_progress": -1},
        {"type": "WarmupLinearSchedule", "warmup": 0.1, "t_total": True, "warned_for_t_total_at_progress": -1},
    ],
)  # fmt: skip
def test_json_form_rejects_anything_else(data):
    with pytest.raises((TypeError, ValueError)):
        ours.LRSchedule.from_json_dict(data)


def test_json_form_of_a_subclass_accepts_only_that_class():
    data = ours.WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=10, cycles=2.0).to_json_dict()
    assert (
        type(ours.WarmupCosineWithHardRestartsSchedule.from_json_dict(data))
        is ours.WarmupCosineWithHardRestartsSchedule
    )
    with pytest.raises(ValueError, match="WarmupCosineWithHardRestartsSchedule"):
        ours.WarmupCosineSchedule.from_json_dict(data)
