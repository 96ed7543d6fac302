"""One training run for the ZeRO state tests, in spawned processes: DeepSpeed ZeRO 1/2/3 (CPU, gloo), FSDP2, or
one plain process, on the same global batches; optionally resuming from / saving hf_optim state mid-way. Each
process reports the final weights (gathered) so runs can be compared with an uninterrupted one."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from tests.multiprocess import report_and_wait

GLOBAL_BATCH = 6
IN, HIDDEN, OUT = 5, 7, 3


def make_model(spec: dict) -> torch.nn.Module:
    """The model, with the weights of ``spec["weights_in"]`` (a run's weights at its save) when given."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
    if spec.get("weights_in"):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(spec["weights_in"]))
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def make_optimizer(params: Any, kind: str, groups: int = 1) -> torch.optim.Optimizer:
    """The optimizer of ``kind``; with ``groups=2`` the weights and the biases in two groups (the biases without
    weight decay), as transformers' Trainer groups them."""
    import hf_optim

    if groups == 2:
        params = list(params)
        decay = {"params": [p for p in params if p.dim() > 1]}
        params = [decay, {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]

    if kind == "torch":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    if kind == "adamw_no_bias_correction":
        return hf_optim.AdamW(params, lr=1e-2, weight_decay=0.01, correct_bias=False)
    if kind == "adam_weight_decay":
        return hf_optim.AdamWeightDecay(params, learning_rate=1e-2, weight_decay_rate=0.01)
    if kind == "bert_adam":  # max_grad_norm clips each parameter: under ZeRO it would clip a flat partition
        return hf_optim.BertAdam(params, lr=1e-2, warmup=0.1, t_total=20, max_grad_norm=-1)
    return hf_optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def make_scheduler(opt: torch.optim.Optimizer) -> Any:
    import hf_optim

    return hf_optim.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=20)


def _deepspeed(rank: int, world: int, spec: dict, *, schedule: bool = True) -> tuple[Any, Any, Any, Any]:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model(spec)
    opt = make_optimizer(model.parameters(), spec.get("optimizer", "hf"), spec.get("groups", 1))
    sched = make_scheduler(opt) if schedule else None
    config: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": spec["stage"], **spec.get("zero_config", {})},
        **spec.get("ds_config", {}),
    }
    if spec.get("dtype") == "bf16":
        config["bf16"] = {"enabled": True}
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, zopt, sched, opt


def _dynamic_scaler(scale: float) -> Any:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler(
        init_scale=scale, scale_window=4, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )


def _scaler_values(zopt: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(zopt.loss_scaler).items() if isinstance(v, bool | int | float)}


def _weights(engine: Any, spec: dict) -> dict[str, torch.Tensor]:
    if spec["engine"] == "zero" and spec["stage"] == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    if spec["engine"] == "fsdp":
        return {n: p.full_tensor().detach().clone() for n, p in engine.named_parameters()}
    module = getattr(engine, "module", engine)
    return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def _snapshot(opt: Any, sched: Any, engine: Any) -> list[Any]:
    """Everything a load may change: the client optimizer's state and groups, the ZeRO master weights, the
    scheduler, the loss scaler."""
    from hf_optim.state.zero import find_zero

    zero = find_zero(opt, engine)
    client = zero.optimizer if zero is not None else opt
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for s in client.state.values()
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups]
    holders = []
    if zero is not None:
        holders = [
            h.detach().clone()
            for h in getattr(zero, "single_partition_of_fp32_groups", None)
            or zero.fp32_partitioned_groups_flat
        ]
    scaler = dict(vars(zero.loss_scaler)) if zero is not None else None
    return [state, groups, holders, sched.state_dict(), scaler]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _attack(directory: str, opt: Any, sched: Any, engine: Any) -> dict[str, Any]:
    """Load a hostile checkpoint: the error it raised, and whether everything stayed as it was."""
    import hf_optim
    from hf_optim.errors import CheckpointError

    before = _snapshot(opt, sched, engine)
    try:
        hf_optim.load_state(directory, opt, sched, model=engine)
        error = "no error"
    except CheckpointError as exc:
        error = f"CheckpointError: {exc}"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "unchanged": _same(before, _snapshot(opt, sched, engine))}


def _train_fresh(spec: dict, rank: int, world: int) -> dict[str, Any]:
    """Train a fresh model for ``spec["stop"]`` steps (DeepSpeed engines only): its final weights, and whether
    ZeRO offloaded the optimizer to the CPU (the client optimizer then steps the offloaded partitions)."""
    engine, zopt, _, _ = _deepspeed(rank, world, spec, schedule=False)
    offloaded = bool(getattr(zopt, "cpu_offload", False) or getattr(zopt, "offload_optimizer", False))
    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    for step in range(spec["stop"]):
        x, y = batch(step)
        local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = torch.nn.functional.mse_loss(engine(x[local].to(dtype)).float(), y[local].float())
        engine.backward(loss)
        engine.step()
    weights = {k: v.flatten().tolist() for k, v in _weights(engine, spec).items()}
    del engine, zopt
    return {"weights": weights, "offloaded": offloaded}


def worker(rank: int, world: int, port: int, out: str, name: str, spec: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    engine = zopt = sched = opt = None
    try:
        import hf_optim

        kind = spec["engine"]
        if kind == "zero":
            engine, zopt, sched, opt = _deepspeed(rank, world, spec)
            dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
        elif kind == "fsdp":
            import torch.distributed as dist
            from torch.distributed.fsdp import fully_shard

            dist.init_process_group("gloo")
            engine = make_model(spec)
            for layer in engine:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(engine)
            opt = make_optimizer(engine.parameters(), spec.get("optimizer", "hf"), spec.get("groups", 1))
            sched = make_scheduler(opt)
            dtype = torch.float32
        else:
            engine = make_model(spec)
            opt = make_optimizer(engine.parameters(), spec.get("optimizer", "hf"), spec.get("groups", 1))
            sched = make_scheduler(opt)
            dtype = torch.float32
        step_opt = zopt if zopt is not None else opt
        if spec.get("dynamic_scaler"):  # fp16's scaler (fp16 ZeRO does not run on CPU), in place of fp32's
            zopt.loss_scaler = _dynamic_scaler(spec["dynamic_scaler"])
        if spec.get("machines"):  # each process plays a machine of its own, with its own Hub cache there
            os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))
        if spec.get("load"):
            cache = os.path.join(spec["machines"], f"machine{rank}") if spec.get("machines") else None
            report = hf_optim.load_state(spec["load"], step_opt, sched, model=engine, cache_dir=cache)
            result["notes"] = list(report.notes)
        if spec.get("partial"):  # the loaded state saved in one file, then both loaded with strict=False
            single = os.path.join(out, "single-file")  # into an optimizer of the first layer only
            hf_optim.save_state(single, opt, sched, model=engine)
            result["partial"] = []
            for source in (spec["load"], single):
                first_layer = [p for n, p in engine.named_parameters() if n.startswith("0.")]
                partial = make_optimizer(first_layer, spec.get("optimizer", "hf"))
                report = hf_optim.load_state(source, partial, model=engine, strict=False)
                fields = ("loaded", "missing", "unexpected", "mismatched", "param_groups_restored")
                result["partial"].append({f: getattr(report, f) for f in fields})
        for step in range(spec.get("start", 0), spec["stop"]):
            x, y = batch(step)
            local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
            x, y = x[local].to(dtype), y[local].to(dtype)
            loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
            if kind == "zero":
                engine.backward(loss)
                engine.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad()
            sched.step()
            if spec.get("save_again") and step + 1 == spec["save_at"] + 1:
                hf_optim.save_state(spec["save_again"], step_opt, sched, model=engine)
            if spec.get("push") and step + 1 == spec.get("save_at"):
                hf_optim.push_state_to_hub(spec["push"], step_opt, sched, model=engine, subfolder="run")
            if spec.get("ds_save") and step + 1 == spec.get("save_at"):  # DeepSpeed's own (pickled) format
                engine.save_checkpoint(spec["ds_save"], tag=f"global_step{step + 1}")
                if rank == 0:  # the scheduler DeepSpeed does not step, saved beside as the Trainer does
                    torch.save(sched.state_dict(), os.path.join(spec["ds_save"], "scheduler.pt"))
            if spec.get("save") and step + 1 == spec.get("save_at"):
                if spec.get("dynamic_scaler"):
                    result["scaler_at_save"] = _scaler_values(zopt)
                hf_optim.save_state(spec["save"], step_opt, sched, model=engine)
                if spec.get("weights_out") and rank == 0:
                    from safetensors.torch import save_file

                    save_file(
                        {k: v.contiguous() for k, v in _weights(engine, spec).items()}, spec["weights_out"]
                    )
                elif spec.get("weights_out"):
                    _weights(engine, spec)
        for other in spec.get("also", ()):  # the same run with other client optimizers, weights by optimizer
            extra = {"optimizer": other, "stop": spec["also_steps"]}
            result.setdefault("also", {})[other] = _train_fresh({**spec, **extra}, rank, world)
        for directory, strict in spec.get("strict_loads", ()):  # what a load reports, or the error it raises
            try:
                report = hf_optim.load_state(directory, step_opt, sched, model=engine, strict=strict)
                fields = ("loaded", "missing", "unexpected", "mismatched", "param_groups_restored", "notes")
                outcome = {f: getattr(report, f) for f in fields}
            except Exception as exc:
                outcome = {"error": f"{type(exc).__name__}: {exc}"}
            result.setdefault("strict_loads", []).append(outcome)
        for directory in spec.get("scaler_loads", ()):  # into a new scaler of the same class, each
            zopt.loss_scaler = _dynamic_scaler(2.0**16)
            hf_optim.load_state(directory, step_opt, sched, model=engine)
            result.setdefault("scalers_loaded", []).append(_scaler_values(zopt))
        if spec.get("attacks"):
            result["attacks"] = [_attack(directory, step_opt, sched, engine) for directory in spec["attacks"]]
        result["weights"] = {k: v.flatten().tolist() for k, v in _weights(engine, spec).items()}
        if kind == "zero":
            result["global_steps"] = engine.global_steps
        result["outcome"] = "ok"
    except Exception as exc:  # reported, not raised: the test shows every rank's outcome
        result["outcome"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        del engine, zopt, opt, sched
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
        report_and_wait(out, name, rank, world, result, timeout=60)
