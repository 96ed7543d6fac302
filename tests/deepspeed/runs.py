"""Training runs shared by the DeepSpeed tests: one run (DeepSpeed ZeRO 1/2/3, FSDP2 or one plain process, see
``zero_worker``) that saves hf_optim state mid-way (and DeepSpeed's own checkpoint beside it), built once per
test run for every xdist worker, then resumed in other layouts.

The reference is one plain process trained on the same global batches, computed here with ``torch.optim``-style
code independent of DeepSpeed (DeepSpeed with ``gradient_clipping: 0`` and FSDP2 agree with it to fp32 rounding).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.deepspeed import zero_worker
from tests.multiprocess import run_with_deadline
from tests.run_cache import once_per_run

SAVE_AT, STOP = 3, 6
DEADLINE = 240


def run(tmp: Path, name: str, world: int, spec: dict[str, Any]) -> list[dict]:
    """``zero_worker.worker`` on ``world`` processes; every process's report (each must be ``ok``)."""
    results = run_with_deadline(zero_worker.worker, world, (str(tmp), name, spec), tmp, name, DEADLINE)
    for r in results:
        assert r["outcome"] == "ok", r.get("traceback", r["outcome"])
    return results


def engine_spec(kind: str) -> dict[str, Any]:
    """``"zero2"``, ``"zero3-bf16"``, ``"fsdp"``, ``"plain"`` as a worker spec."""
    if kind.startswith("zero"):
        spec: dict[str, Any] = {"engine": "zero", "stage": int(kind[4])}
        if kind.endswith("bf16"):
            spec["dtype"] = "bf16"
        return spec
    return {"engine": kind}


def reference(groups: int = 1) -> dict[str, list[float]]:
    """One plain process, uninterrupted, on the same global batches (in this process)."""
    model = zero_worker.make_model({})
    opt = zero_worker.make_optimizer(model.parameters(), "hf", groups)
    sched = zero_worker.make_scheduler(opt)
    for step in range(STOP):
        x, y = zero_worker.batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach().flatten().tolist() for k, v in model.named_parameters()}


def max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))


class Saved:
    """A run of ``kind`` on ``world`` processes to ``STOP`` that saved at ``SAVE_AT``: hf_optim's state in
    ``directory``, DeepSpeed's own checkpoint (ZeRO runs) in ``deepspeed``, the weights in ``weights``; with
    ``again``, hf_optim's state one step later in ``again``. ``results`` are the processes' reports. ``extra``:
    more of the worker's spec (``groups``, ``zero_config``), for this run and its resumes."""

    def __init__(
        self,
        tmp: Path,
        kind: str,
        world: int,
        *,
        again: bool = False,
        build: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.tmp, self.kind, self.world, self.extra = tmp, kind, world, extra or {}
        self.directory, self.weights = tmp / "state", tmp / "weights.safetensors"
        self.deepspeed, self.again = tmp / "deepspeed", tmp / "state-again"
        if build:
            spec = {
                **engine_spec(kind),
                **self.extra,
                "stop": STOP,
                "save": str(self.directory),
                "save_at": SAVE_AT,
            }
            spec["weights_out"] = str(self.weights)
            if kind.startswith("zero"):
                spec["ds_save"] = str(self.deepspeed)
            if again:
                spec["save_again"] = str(self.again)
            run(tmp, "saving", world, spec)
        self.results = [json.loads((tmp / f"saving_{r}.json").read_text()) for r in range(world)]

    @classmethod
    def shared(
        cls,
        factory: pytest.TempPathFactory,
        kind: str,
        world: int,
        *,
        again: bool = False,
        extra: dict[str, Any] | None = None,
        label: str = "",
    ) -> Saved:
        """The run made once per test run (by whichever worker asks first); ``label`` names an ``extra``."""
        name = f"saved-{kind}-on-{world}{'-again' if again else ''}{label}"
        tmp = once_per_run(factory, name, lambda out: cls(out, kind, world, again=again, extra=extra))
        return cls(tmp, kind, world, again=again, build=False, extra=extra)

    def resume(self, kind: str, world: int, name: str, **extra: Any) -> list[dict]:
        """Resume from ``directory`` (``load=`` another folder) in another layout, from ``SAVE_AT`` to ``STOP``."""
        spec = {
            **engine_spec(kind),
            **self.extra,
            "start": SAVE_AT,
            "stop": STOP,
            "load": str(self.directory),
        }
        # reports in a folder of this resume's own: a shared run's folder is read by other workers' tests
        reports = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp))
        return run(reports, name, world, {**spec, "weights_in": str(self.weights), **extra})
