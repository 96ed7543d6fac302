"""Multi-process Accelerate runs on CPU (DDP over gloo), launched with ``accelerate launch`` as users do.

Every run asserts that two processes really ran (each rank prints ``world_size=2 rank=R``). References are
independent of the code under test: a plain PyTorch loop without Accelerate over the same global batches
(``sum of item losses / item count`` per window), the schedule formula written out, and autograd on the
concatenated global batch.

When this file is run as a script (``accelerate launch ... test_accelerate_multiprocess.py --cpu OUT``) it is
the worker of ``test_item_normalised_gradient_and_scheduler_two_processes``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integrations.scripts import load_script
from tests.multiprocess import end_accelerate

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_accelerate.py"
LAUNCH_TIMEOUT = 240  # seconds; a 2-process run takes ~10 s on a quiet 2-core machine

# ----------------------------------------------------------------------------------------------------------
# Worker: item-normalised gradients, no_sync on non-sync micro-steps, scheduler stepping (run in 2 processes)
# ----------------------------------------------------------------------------------------------------------

WORKER_K = 3  # gradient_accumulation_steps
WORKER_STEPS = 4  # optimizer steps
WORKER_LR = 0.1
WORKER_WARMUP = 1
WORKER_TOTAL = 8  # num_training_steps of the schedules


def _worker_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _worker_batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of optimizer step ``step`` on process ``rank``: 1 to 6 items, unequal on purpose."""
    n = 1 + (7 * rank + 3 * micro + 5 * step) % 6
    g = torch.Generator().manual_seed(1000 * step + 100 * rank + micro)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


class _Registered:
    """An object registered with ``accelerator.register_for_checkpointing``."""

    def __init__(self, value: float) -> None:
        self.value = torch.tensor([value])

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"].clone()


def _worker_main(out_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=WORKER_K)
    _worker_job(accelerator, out_dir)  # returns nothing: what it prepared is released with its frame
    end_accelerate(accelerator)


def _worker_job(accelerator: Any, out_dir: str) -> None:
    from safetensors.torch import save_file

    import hf_optim

    rank = accelerator.process_index
    print(f"world_size={accelerator.num_processes} rank={rank}", flush=True)

    model = _worker_model()
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=WORKER_LR)
    scheduler = hf_optim.create_scheduler(
        "linear", optimizer, num_warmup_steps=WORKER_WARMUP, num_training_steps=WORKER_TOTAL
    )
    model, optimizer, scheduler = hf_optim.accelerate_prepare(accelerator, model, optimizer, scheduler)
    # Control: the same schedule prepared with plain accelerator.prepare (Accelerate's default stepping).
    control_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=WORKER_LR)
    control_sched = hf_optim.create_scheduler(
        "linear", control_opt, num_warmup_steps=WORKER_WARMUP, num_training_steps=WORKER_TOTAL
    )
    control_opt, control_sched = accelerator.prepare(control_opt, control_sched)

    normalizer = hf_optim.ItemNormalizer(accelerator, model)
    bare = accelerator.unwrap_model(model)
    records = []
    for step in range(WORKER_STEPS):
        for micro in range(WORKER_K):
            x, y = _worker_batch(step, rank, micro)
            before = [p.detach().clone() for p in bare.parameters()]
            with accelerator.accumulate(model):
                loss_sum = ((model(x) - y) ** 2).sum()
                normalizer.backward(loss_sum, x.shape[0])
                sync = accelerator.sync_gradients
                flat = torch.cat([p.grad.flatten() for p in bare.parameters()])
                gathered = accelerator.gather(flat[None])
                if sync and step == 0 and accelerator.is_main_process:
                    save_file(
                        {name: p.grad.detach().clone() for name, p in bare.named_parameters()},
                        os.path.join(out_dir, "grads_step0.safetensors"),
                    )
                    window = {"num_items": normalizer.num_items, "loss": normalizer.loss}
                optimizer.step()
                scheduler.step()
                control_opt.step()
                control_sched.step()
                optimizer.zero_grad()
            changed = any(not torch.equal(b, p) for b, p in zip(before, bare.parameters(), strict=True))
            state = next(iter(optimizer.optimizer.state.values()), {})
            records.append(
                {
                    "step": step,
                    "micro": micro,
                    "sync": sync,
                    "grads_equal_across_ranks": torch.equal(gathered[0], gathered[1]),
                    "params_changed": changed,
                    "adam_step": float(state["step"]) if "step" in state else 0.0,
                }
            )
    # A process-local GradientAccumulator cannot be saved mid-window by the main process alone ...
    accumulator = hf_optim.GradientAccumulator()
    loss_sum = ((model(torch.ones(1, 4)) - 1) ** 2).sum()
    with accelerator.no_sync(model):
        loss_sum.backward()
    accumulator.accumulate_from(bare, num_items=1)
    try:
        hf_optim.accelerate_save_state(accelerator, os.path.join(out_dir, "ckpt"), accumulator=accumulator)
        mid_window_error = None
    except ValueError as err:
        mid_window_error = str(err)
    # ... and can between windows.
    accumulator.reset()
    hf_optim.accelerate_save_state(accelerator, os.path.join(out_dir, "ckpt"), accumulator=accumulator)
    # The accelerator's own save_state / load_state in hf_optim's format: the main process writes the
    # registered object's state, every process reads it back.
    registered = _Registered(10.0 + rank)
    accelerator.register_for_checkpointing(registered)
    hf_optim.use_safetensors_state(accelerator)
    plain_dir = os.path.join(out_dir, "plain")
    accelerator.save_state(plain_dir)
    registered.value = torch.tensor([-1.0])
    accelerator.load_state(plain_dir)
    registered_values = accelerator.gather(registered.value).tolist()
    if accelerator.is_main_process:
        adam_step = next(iter(optimizer.optimizer.state.values()))["step"]
        result = {
            "world_size": accelerator.num_processes,
            "records": records,
            "window0": window,
            "last_epoch": scheduler.scheduler.last_epoch,
            "lr": scheduler.get_last_lr()[0],
            "control_last_epoch": control_sched.scheduler.last_epoch,
            "adam_step": float(adam_step),
            "mid_window_error": mid_window_error,
            "registered_values": registered_values,
            "plain_files": sorted(
                os.path.relpath(os.path.join(d, n), plain_dir)
                for d, _, names in os.walk(plain_dir)
                for n in names
            ),
        }
        with open(os.path.join(out_dir, "worker.json"), "w") as f:
            json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], num_processes: int) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_child_env(), timeout=LAUNCH_TIMEOUT, cwd=ROOT
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}"
    for rank in range(num_processes):
        assert f"world_size={num_processes} rank={rank}" in proc.stdout, output[-4000:]
    return output


def _launch(script: Path, args: list[str], num_processes: int) -> str:
    if num_processes == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            str(script),
            *args,
        ]
    return _run(cmd, num_processes)


# ----------------------------------------------------------------------------------------------------------
# Item-normalised gradient, no_sync, no step on non-sync micro-steps, schedule in optimizer steps
# ----------------------------------------------------------------------------------------------------------


def _linear_lr(step: int) -> float:
    """transformers' linear schedule with warmup, written out: lr after ``step`` scheduler steps."""
    if step < WORKER_WARMUP:
        return WORKER_LR * step / WORKER_WARMUP
    return WORKER_LR * max(0.0, (WORKER_TOTAL - step) / (WORKER_TOTAL - WORKER_WARMUP))


def test_item_normalised_gradient_and_scheduler_two_processes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _launch(Path(__file__), ["--cpu", str(tmp_path)], num_processes=2)
    result = json.loads((tmp_path / "worker.json").read_text())
    assert result["world_size"] == 2

    # Reference: autograd on the concatenation of both processes' K micro-batches of step 0, mean over items.
    model = _worker_model()
    batches = [_worker_batch(0, rank, micro) for rank in range(2) for micro in range(WORKER_K)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    counts = [b[0].shape[0] for b in batches]
    assert len(set(counts)) > 1  # unequal micro-batches, or the test would not tell the normalisations apart
    loss = ((model(x) - y) ** 2).sum() / x.shape[0]
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    got = load_file(tmp_path / "grads_step0.safetensors")
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7)
    assert result["window0"]["num_items"] == x.shape[0]
    assert abs(result["window0"]["loss"] - loss.item()) <= 1e-6 * abs(loss.item())

    # The naive normalisation (mean per micro-batch, averaged over micro-batches and processes) differs.
    naive_model = _worker_model()
    naive = sum(((naive_model(bx) - by) ** 2).mean() for bx, by in batches) / len(batches)
    naive.backward()
    naive_diff = max((p.grad - expected[n]).abs().max().item() for n, p in naive_model.named_parameters())
    assert naive_diff > 1e-3

    # Accumulation: DDP's no_sync on non-sync micro-steps (local gradients differ between the processes),
    # synchronised gradients on the last one, and no optimizer step except there.
    records = result["records"]
    assert [r["sync"] for r in records] == [
        m == WORKER_K - 1 for _ in range(WORKER_STEPS) for m in range(WORKER_K)
    ]
    for r in records:
        assert r["grads_equal_across_ranks"] == r["sync"], r
        assert r["adam_step"] == r["step"] + r["sync"], r  # Adam's step counter: optimizer steps so far
        # parameters move only on optimizer steps (the first one has lr 0: linear warmup starts at 0)
        assert r["params_changed"] == (r["sync"] and _linear_lr(r["step"]) > 0), r
    assert result["adam_step"] == WORKER_STEPS

    # Schedules counted in optimizer steps: accelerate_prepare steps once per optimizer step ...
    assert result["last_epoch"] == WORKER_STEPS
    assert abs(result["lr"] - _linear_lr(WORKER_STEPS)) <= 1e-12
    assert _linear_lr(WORKER_STEPS) > 0
    # ... while Accelerate's default steps the same schedule num_processes times (the bug being fixed).
    assert result["control_last_epoch"] == 2 * WORKER_STEPS

    # accelerate_save_state refuses a process-local accumulator mid-window, saves it between windows.
    assert "mid-window" in result["mid_window_error"]
    assert (tmp_path / "ckpt" / "accumulator.safetensors").is_file()
    assert (tmp_path / "ckpt" / "optimizer.safetensors").is_file()

    # use_safetensors_state: the main process's registered state (10.0) is what every process loads, and the
    # folder holds no pickle at all: each process's random states are safetensors too.
    assert result["registered_values"] == [10.0, 10.0]
    files = result["plain_files"]
    assert [n for n in files if not n.endswith((".safetensors", ".json"))] == []
    assert {"random_states_0.safetensors", "random_states_1.safetensors"} <= set(files)
    assert {
        "custom_checkpoint_0.safetensors",
        "optimizer.safetensors",
        "optimizer_1/optimizer.safetensors",
    } <= set(files)


# ----------------------------------------------------------------------------------------------------------
# scripts/train_accelerate.py: 2 processes vs 1 process vs a plain loop; resume across world sizes and the Hub
# ----------------------------------------------------------------------------------------------------------

# 36 samples: 9 micro-batches of 4 samples per epoch (2 processes x 2, or 1 process x 4), so with K = 2 each
# epoch has 4 full windows and a last window of one micro-batch; a checkpoint at step 4 is mid-epoch and
# step 6 is in the second epoch.
TRAIN = {
    "num_samples": 36,
    "seq_len": 12,
    "vocab_size": 24,
    "hidden_size": 16,
    "seed": 3,
    "optim": "adamw_hf",
    "lr_scheduler_type": "linear",
    "learning_rate": 1e-2,
    "weight_decay": 0.1,
    "num_warmup_steps": 2,
    "max_steps": 6,
    "gradient_accumulation_steps": 2,
}
GLOBAL_BATCH = 4
SAVE_STEP = 4


def _script_module() -> Any:
    return load_script("train_accelerate.py", "train_accelerate_under_test")


def _train_args(output_dir: Path, per_device_batch: int, *extra: str) -> list[str]:
    args = [
        "--cpu",
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--save_steps",
        str(SAVE_STEP),
    ]
    for key, value in TRAIN.items():
        args += [f"--{key}", str(value)]
    return [*args, *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain PyTorch, one process, no Accelerate: each window's update uses sum(item losses) / item count."""
    import hf_optim

    ta = _script_module()
    model = ta.build_model(TRAIN["vocab_size"], TRAIN["hidden_size"], TRAIN["seed"])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = ta.build_dataset(TRAIN["num_samples"], TRAIN["seq_len"], TRAIN["vocab_size"], TRAIN["seed"])
    optimizer = hf_optim.create_optimizer(
        TRAIN["optim"], model, lr=TRAIN["learning_rate"], weight_decay=TRAIN["weight_decay"]
    )
    scheduler = hf_optim.create_scheduler(
        TRAIN["lr_scheduler_type"],
        optimizer,
        num_warmup_steps=TRAIN["num_warmup_steps"],
        num_training_steps=TRAIN["max_steps"],
    )
    window = GLOBAL_BATCH * TRAIN["gradient_accumulation_steps"]
    windows_per_epoch = -(-TRAIN["num_samples"] // window)
    for step in range(TRAIN["max_steps"]):
        start = (step % windows_per_epoch) * window
        batch = tuple(t[start : start + window] for t in data.tensors)
        loss_sum, num_items = ta.loss_sum_and_items(model, batch)
        (loss_sum / num_items).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-5, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _reference()


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """2 processes x batch 2 x accumulation 2, checkpoint at step 4: (output dir, captured output)."""
    out = tmp_path_factory.mktemp("two_proc")
    return out, _launch(SCRIPT, _train_args(out, 2), 2)


@pytest.fixture(scope="module")
def one_proc_run(tmp_path_factory: pytest.TempPathFactory, hub_server) -> tuple[Path, str]:
    """1 process x batch 4 x accumulation 2 (the same global batches), its checkpoints pushed to the local Hub:
    (output dir, repo id)."""
    out = tmp_path_factory.mktemp("one_proc")
    repo_id = f"local-user/test-{uuid.uuid4().hex[:12]}"
    _launch(SCRIPT, _train_args(out, GLOBAL_BATCH, "--push_to_hub_repo", repo_id), 1)
    return out, repo_id


def test_two_processes_match_one_process_and_plain_loop(two_proc_run, one_proc_run, reference) -> None:
    (two, _), (one, _) = two_proc_run, one_proc_run
    initial, expected = reference
    assert (
        max((expected[k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    )  # training moved weights
    _assert_same_weights(_weights(two / "model.safetensors"), expected)
    _assert_same_weights(_weights(one / "model.safetensors"), expected)
    results = json.loads((two / "train_results.json").read_text())
    assert results["world_size"] == 2
    assert results["global_step"] == TRAIN["max_steps"]


def test_two_process_schedule_counts_optimizer_steps(two_proc_run) -> None:
    two, log = two_proc_run
    results = json.loads((two / "train_results.json").read_text())
    assert results["scheduler_last_epoch"] == TRAIN["max_steps"]
    lr0, warmup, total = TRAIN["learning_rate"], TRAIN["num_warmup_steps"], TRAIN["max_steps"]
    logged = {
        int(s): float(lr) for s, lr in re.findall(r"step=(\d+) epoch=\d+ loss=\S+ items=\d+ lr=(\S+)", log)
    }
    assert sorted(logged) == list(range(1, total + 1))
    for step, lr in logged.items():  # the lr set for the step after `step`, by the formula written out
        expected = lr0 * step / warmup if step < warmup else lr0 * max(0.0, (total - step) / (total - warmup))
        assert abs(lr - expected) <= 1e-5 * lr0, (step, lr, expected)


def _resume_args(output_dir: Path, checkpoint: Path) -> list[str]:
    """Resuming from ``checkpoint`` on 1 process, without the schedule's arguments (the checkpoint has it)."""
    args = _train_args(output_dir, GLOBAL_BATCH, "--resume_from", str(checkpoint))
    for name in ("lr_scheduler_type", "num_warmup_steps", "max_steps"):
        i = args.index(f"--{name}")
        del args[i : i + 2]
    return args


def test_resume_two_process_checkpoint_in_one_process(two_proc_run, reference, tmp_path: Path) -> None:
    """Resumed without schedule arguments, the run follows the checkpoint's schedule (scheduler.json)."""
    checkpoint = two_proc_run[0] / f"checkpoint-{SAVE_STEP}"
    names = set(os.listdir(checkpoint))
    assert {"model.safetensors", "optimizer.safetensors", "scheduler.json"} <= names
    assert not names & {"optimizer.bin", "scheduler.bin"}  # nothing pickled for optimizer / scheduler
    log = _launch(SCRIPT, _resume_args(tmp_path, checkpoint), 1)
    assert f"at step {SAVE_STEP}" in log
    _assert_same_weights(_weights(tmp_path / "model.safetensors"), reference[1])


def test_resume_one_process_checkpoint_in_two_processes_from_local_hub(
    one_proc_run, reference, tmp_path: Path
) -> None:
    url = f"hf://{one_proc_run[1]}/checkpoint-{SAVE_STEP}"
    log = _launch(SCRIPT, _train_args(tmp_path, 2, "--resume_from", url), 2)
    assert f"at step {SAVE_STEP}" in log
    _assert_same_weights(_weights(tmp_path / "model.safetensors"), reference[1])


def test_a_schedule_given_on_resume_wins_over_the_checkpoints(two_proc_run, tmp_path: Path) -> None:
    """The linear schedule's lr is written out as the reference."""
    checkpoint = two_proc_run[0] / f"checkpoint-{SAVE_STEP}"
    log = _launch(SCRIPT, [*_resume_args(tmp_path, checkpoint), "--num_warmup_steps", "0"], 1)
    lr0, total = TRAIN["learning_rate"], TRAIN["max_steps"]
    logged = {
        int(s): float(lr) for s, lr in re.findall(r"step=(\d+) epoch=\d+ loss=\S+ items=\d+ lr=(\S+)", log)
    }
    assert abs(logged[total - 1] - lr0 * 1 / total) <= 1e-5 * lr0  # warmup 0: linear decay over all 6 steps


if __name__ == "__main__":
    # Worker mode under `accelerate launch`: argv = ["--cpu", OUT_DIR]
    _worker_main(sys.argv[-1])
