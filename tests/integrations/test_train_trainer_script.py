"""``scripts/train_trainer.py`` when resuming: the schedule comes from the checkpoint's ``scheduler.json``.

The references are an uninterrupted run of the same configuration (its learning rate at every step) and
``scheduler.json`` documents written by hand from docs/FORMAT.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.scripts import load_script

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_trainer.py"
N_STEPS = 12
STOP_AT = 5
# not the defaults (linear, no warmup, epochs): a resume that ignored the checkpoint would change every rate
SCHEDULE = [
    "--lr_scheduler_type",
    "cosine_with_restarts",
    "--lr_scheduler_kwargs",
    '{"num_cycles": 2}',
    "--warmup_steps",
    "3",
    "--max_steps",
    str(N_STEPS),
]


def _load_script():
    return load_script("train_trainer.py", "hf_optim_train_trainer_script_schedule")


train_script = _load_script()


def common_args(output_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--optim",
        "adamw_hf",
        "--learning_rate",
        "3e-3",
        "--weight_decay",
        "0.01",
        "--save_steps",
        "100",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--num_train_examples",
        "64",
        "--num_eval_examples",
        "8",
        "--hidden_size",
        "32",
        "--intermediate_size",
        "37",
        "--seed",
        "11",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def read_step_log(path: Path) -> dict[int, tuple[float, float]]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: (r["loss"], r["learning_rate"]) for r in records}


def write_scheduler_json(directory: Path, name: str | None, kwargs: dict) -> Path:
    """A scheduler.json as docs/FORMAT.md describes it (only the fields the script reads are meaningful)."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "hf_optim.scheduler",
        "format_version": 1,
        "checkpoint_id": "0" * 32,
        "class": "torch.optim.lr_scheduler.LambdaLR",
        "name": name,
        "kwargs": kwargs,
        "state_dict": {"dict": {"base_lrs": [0.001], "last_epoch": 4}},
    }
    (directory / "scheduler.json").write_text(json.dumps(doc), encoding="utf-8")
    return directory


def schedule_of(training_args) -> tuple:
    return (
        getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        training_args.warmup_steps,
        training_args.max_steps,
        training_args.lr_scheduler_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# End to end: resume in a new process without the schedule arguments
# ---------------------------------------------------------------------------------------------------------------


def test_resume_without_schedule_arguments_gives_the_uninterrupted_rates(tmp_path):
    reference = tmp_path / "reference"
    summary = train_script.main(common_args(reference, *SCHEDULE, "--step_log", str(tmp_path / "ref.jsonl")))
    assert summary["global_step"] == N_STEPS
    first = tmp_path / "first"
    summary = train_script.main(
        common_args(
            first, *SCHEDULE, "--stop_after_step", str(STOP_AT), "--step_log", str(tmp_path / "a.jsonl")
        )
    )
    assert summary["global_step"] == STOP_AT and summary["stopped_early"]

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
    }
    resume = common_args(
        tmp_path / "resumed",
        "--resume_from_checkpoint",
        str(first / f"checkpoint-{STOP_AT}"),
        "--step_log",
        str(tmp_path / "b.jsonl"),
    )
    assert not set(resume) & {"--lr_scheduler_type", "--warmup_steps", "--max_steps", "--lr_scheduler_kwargs"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *resume], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "schedule from the checkpoint's scheduler.json" in result.stderr
    assert " WARNING train_trainer" not in result.stderr

    want = read_step_log(tmp_path / "ref.jsonl")
    before, after = read_step_log(tmp_path / "a.jsonl"), read_step_log(tmp_path / "b.jsonl")
    assert sorted(before) == list(range(1, STOP_AT + 1))
    assert sorted(after) == list(range(STOP_AT + 1, N_STEPS + 1))  # the checkpoint's max_steps
    assert {s: lr for s, (_, lr) in {**before, **after}.items()} == {s: lr for s, (_, lr) in want.items()}
    assert {**before, **after} == want  # and the losses, so the same training happened

    # and those rates are the schedule's: step s uses 3e-3 * f(s - 1), two hard-restart cosine cycles after
    # 3 warmup steps (transformers' formula, written out)
    def f(t: int) -> float:
        if t < 3:
            return t / 3
        progress = (t - 3) / (N_STEPS - 3)
        return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1.0)))

    assert [want[s][1] for s in sorted(want)] == pytest.approx(
        [3e-3 * f(s - 1) for s in sorted(want)], rel=1e-12
    )


# ---------------------------------------------------------------------------------------------------------------
# Argument handling, against hand-written scheduler.json files
# ---------------------------------------------------------------------------------------------------------------


RECORDED = {"dict": {"num_warmup_steps": 5, "num_training_steps": 50, "num_cycles": 3}}


def test_missing_schedule_arguments_come_from_the_checkpoint(tmp_path, caplog):
    checkpoint = write_scheduler_json(tmp_path / "ckpt", "cosine_with_restarts", RECORDED)
    with caplog.at_level(logging.WARNING, logger="train_trainer"):
        *_, training_args = train_script.parse(
            common_args(tmp_path / "out", "--resume_from_checkpoint", str(checkpoint))
        )
    assert schedule_of(training_args) == ("cosine_with_restarts", 5, 50, {"num_cycles": 3})
    assert training_args.resume_from_checkpoint == str(checkpoint)
    assert not caplog.records


def test_given_values_win_and_a_difference_is_one_warning_line(tmp_path, caplog):
    checkpoint = write_scheduler_json(tmp_path / "ckpt", "cosine_with_restarts", RECORDED)
    argv = common_args(
        tmp_path / "out",
        "--resume_from_checkpoint",
        str(checkpoint),
        "--max_steps",
        "60",  # differs
        "--warmup_steps",
        "5",  # same as the checkpoint
    )
    with caplog.at_level(logging.WARNING, logger="train_trainer"):
        *_, training_args = train_script.parse(argv)
    assert schedule_of(training_args) == ("cosine_with_restarts", 5, 60, {"num_cycles": 3})
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("--max_steps 60 differs from the checkpoint's 50 (")
    assert str(checkpoint / "scheduler.json") in messages[0] and messages[0].endswith("using 60")


@pytest.mark.parametrize(
    ("name", "recorded", "given", "warned"),
    [
        # cosine's num_cycles defaults to 0.5: "{}" means the recorded value
        ("cosine", {"num_cycles": 0.5}, "{}", False),
        ("cosine", {"num_cycles": 0.5}, '{"num_cycles": 0.5}', False),
        ("cosine", {"num_cycles": 0.5}, '{"num_cycles": 2}', True),
        # cosine_with_restarts' num_cycles defaults to 1: "{}" is not the recorded 3
        ("cosine_with_restarts", {"num_cycles": 3}, "{}", True),
    ],
)
def test_given_schedule_kwargs_are_compared_with_the_schedule_defaults(
    tmp_path, caplog, name, recorded, given, warned
):
    kwargs = {"dict": {"num_warmup_steps": 5, "num_training_steps": 50, **recorded}}
    checkpoint = write_scheduler_json(tmp_path / "ckpt", name, kwargs)
    argv = common_args(
        tmp_path / "out", "--resume_from_checkpoint", str(checkpoint), "--lr_scheduler_kwargs", given
    )
    with caplog.at_level(logging.WARNING, logger="train_trainer"):
        *_, training_args = train_script.parse(argv)
    assert training_args.lr_scheduler_kwargs == json.loads(given)
    assert [r.getMessage().split(" differs")[0] for r in caplog.records] == (
        [f"--lr_scheduler_kwargs {given}"] if warned else []
    )


def test_epochs_given_keep_max_steps_unset(tmp_path):
    checkpoint = write_scheduler_json(tmp_path / "ckpt", "cosine_with_restarts", RECORDED)
    argv = common_args(
        tmp_path / "out", "--resume_from_checkpoint", str(checkpoint), "--num_train_epochs", "2"
    )
    *_, training_args = train_script.parse(argv)
    assert (training_args.max_steps, training_args.num_train_epochs) == (-1, 2)
    assert schedule_of(training_args)[:2] == ("cosine_with_restarts", 5)


def test_json_argument_file(tmp_path):
    checkpoint = write_scheduler_json(tmp_path / "ckpt", "cosine_with_restarts", RECORDED)
    config = tmp_path / "args.json"
    config.write_text(
        json.dumps(
            {"output_dir": str(tmp_path / "out"), "resume_from_checkpoint": str(checkpoint), "max_steps": 50}
        ),
        encoding="utf-8",
    )
    *_, training_args = train_script.parse([str(config)])
    assert schedule_of(training_args) == ("cosine_with_restarts", 5, 50, {"num_cycles": 3})


def test_no_schedule_name_or_no_file_changes_nothing(tmp_path):
    unnamed = write_scheduler_json(tmp_path / "unnamed", None, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    for checkpoint in (unnamed, empty):
        *_, training_args = train_script.parse(
            common_args(tmp_path / "out", "--resume_from_checkpoint", str(checkpoint))
        )
        assert schedule_of(training_args) == ("linear", 0, -1, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dict": {"num_cycles": {"tensor": "state.x"}}},  # tensors have no place in scheduler.json
        {"dict": {"num_cycles": {"float": "1e999"}}},
        ["num_cycles", 3],
    ],
)
def test_malformed_arguments_are_refused(tmp_path, kwargs):
    checkpoint = write_scheduler_json(tmp_path / "ckpt", "cosine", kwargs)
    with pytest.raises(ValueError, match=r"scheduler\.json"):
        train_script.parse(common_args(tmp_path / "out", "--resume_from_checkpoint", str(checkpoint)))


def test_decode_value_follows_the_format():
    node = {"dict": {"a": {"tuple": [1, {"float": "inf"}]}, "b": [None, True, "x", 0.5]}}
    assert train_script.decode_value(node, "here") == {"a": (1, float("inf")), "b": [None, True, "x", 0.5]}
