"""Multi-process tests that must not hang: each process reports its outcome in a JSON file, and a process still
running after a deadline counts as a hang (a failure naming where each process got to), not a stuck test run.

Worker processes are forked from a server process that has imported torch once (``forkserver``), not started
from scratch (``spawn``): the import costs more than most jobs. The server also imports what costs most after
torch and reads no per-test environment (DCP with DTensor, safetensors, dynamo, DeepSpeed under
``DS_ACCELERATOR=cpu``), then ``tests/fork_server.py``.
Each worker gets the environment of the moment it was started (the server's would be the one of its own start),
and imports everything else itself.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException


def _preload() -> list[str]:
    """What the fork server imports once. Not a module that reads the environment when imported
    (huggingface_hub's constants, hence hf_optim): each worker imports it under the environment it is given.
    DeepSpeed picks its accelerator when imported: preloaded only when the tests set it (tests/conftest.py)."""
    # torch._dynamo: imported by the first torch.optim.Optimizer made in a process
    modules = [
        "torch",
        "torch.distributed",
        "torch.distributed.checkpoint",
        "safetensors.torch",
        "torch._dynamo",
    ]
    if os.environ.get("DS_ACCELERATOR") == "cpu" and importlib.util.find_spec("deepspeed") is not None:
        # deepspeed.initialize imports its Muon optimizer, which compiles with torch.compile (torch._inductor)
        modules += ["deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer"]
    return [*modules, "tests.fork_server"]


def _with_environ(rank: int, environ: dict[str, str], worker: Callable[..., None], *args: Any) -> None:
    # the fork server skips a preload it cannot import: it must find this checkout (an editable install)
    assert "tests.fork_server" in sys.modules, "the fork server did not import tests.fork_server"
    os.environ.clear()
    os.environ.update(environ)
    worker(rank, *args)


def start_workers(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> ProcessContext:
    """``worker(rank, *args)`` on ``nprocs`` new processes (forked from the torch-importing server, with this
    process's current environment); join the returned context."""
    multiprocessing.set_forkserver_preload(_preload())  # read when this process's fork server starts
    context = mp.start_processes(
        _with_environ,
        args=(dict(os.environ), worker, *args),
        nprocs=nprocs,
        join=False,
        start_method="forkserver",
    )
    assert context is not None
    return context


def run_workers(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """:func:`start_workers` and wait for them; raises ``ProcessRaisedException`` / ``ProcessExitedException``
    as ``torch.multiprocessing.spawn`` does when one fails."""
    context = start_workers(worker, args, nprocs)
    while not context.join():
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_and_wait(
    out: str | os.PathLike[str], name: str, rank: int, world: int, result: dict, timeout: float
) -> None:
    """Write this process's ``result`` to ``out/<name>_<rank>.json``, then wait (polling, no collective: a
    process that left early must not meet another's pending collective) until every process has reported."""
    path = Path(out, f"{name}_{rank}.json")
    Path(f"{path}.tmp").write_text(json.dumps(result))
    os.replace(f"{path}.tmp", path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(
        Path(out, f"{name}_{r}.json").exists() for r in range(world)
    ):
        time.sleep(0.2)


def run_with_deadline(
    worker: Callable[..., None],
    world: int,
    args: tuple[Any, ...],
    out: str | os.PathLike[str],
    name: str,
    timeout: float,
) -> list[dict]:
    """``worker(rank, world, port, *args)`` on ``world`` spawned processes; the reports they wrote with
    :func:`report_and_wait` (``name``), rank by rank. Fails if a process is still running after ``timeout`` s."""
    context = start_workers(worker, (world, free_port(), *args), world)
    deadline = time.monotonic() + timeout
    hung = False
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                hung = True
                break
    except ProcessException:  # a process that died: its report (or its absence) tells
        pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    results = []
    for rank in range(world):
        path = Path(out, f"{name}_{rank}.json")
        results.append(
            json.loads(path.read_text()) if path.exists() else {"outcome": "no result (hung or died)"}
        )
    assert not hung, f"hang: processes still running after {timeout} s: {results}"
    return results


def end_accelerate(accelerator: Any) -> None:
    """End an Accelerate worker the way scripts/train_accelerate.py does: release what holds the process group
    (the DDP reducer of a prepared model, the prepared optimizer and dataloaders), meet, then destroy the group.
    Left to interpreter teardown, the group's destructor can wait forever for gloo's threads."""
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def end_process_group() -> None:
    """Destroy the default process group of a spawned worker once nothing holds it.

    Call it after the job's function has returned (its models gone with its frame): an FSDP2 model's device mesh
    holds the group, and a group whose last reference goes at interpreter exit can wait forever for gloo's
    threads. Collect what is left, meet (no process tears gloo down while another still talks to it), destroy.
    """
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
