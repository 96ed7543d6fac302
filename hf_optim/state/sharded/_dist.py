"""Process-group helpers for sharded state: every rank must reach the same verdict, without pickling."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from hf_optim._utils import unwrap_engine, unwrap_optimizer


def is_sharded(optimizer: Any) -> bool:
    """Whether ``optimizer``'s parameters are ``DTensor``s (FSDP2 ``fully_shard``), so its state is sharded."""
    from torch.distributed.tensor import DTensor

    opt = unwrap_optimizer(optimizer)
    return any(isinstance(p, DTensor) for group in opt.param_groups for p in group["params"])


def require_model(optimizer: Any, model: Any, directory: str | None = None) -> None:
    """Sharded state is named through the model: refuse a call without ``model=`` when the optimizer is sharded
    (or ``directory`` holds sharded state)."""
    if model is not None:
        return
    if is_sharded(optimizer):
        raise ValueError(
            "the optimizer's state is sharded (FSDP2 DTensor parameters): pass model= to name it"
        )
    if directory is not None:
        raise ValueError(f"{directory} holds sharded optimizer state: pass model= to name the parameters")


# ---------------------------------------------------------------------------------------------------------------
# Process-group helpers: every rank must reach the same verdict
# ---------------------------------------------------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where this process group's collectives take tensors: the accelerator for backends that only take
    device tensors (NCCL and its kin), else the CPU (gloo, or a mixed ``cpu:gloo,cuda:nccl`` group)."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)  # None without one
    if dist.get_backend() in ("nccl", "xccl", "hccl") and accelerator is not None:
        return torch.device(accelerator.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def _bytes(tensor: torch.Tensor, size: int | None = None) -> bytes:
    return bytes(tensor[:size].cpu().tolist())


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


def agree(error: str | None) -> str | None:
    """Every rank's verdict: its own error, else the first error another rank met, else ``None``."""
    if not distributed():
        return error
    device = _device()
    data = (error or "").encode(errors="backslashreplace")  # names from a file may not be encodable
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:
        return None
    buf = torch.zeros(max(counts), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    if error is not None:
        return error
    for other, (count, b) in enumerate(zip(counts, bufs, strict=True)):
        if count:
            return f"{_bytes(b, count).decode(errors='replace')} (on rank {other})"
    return None  # pragma: no cover - a non-zero size was seen above


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (no pickling)."""
    if not distributed():
        return text
    device = _device()
    data = text.encode(errors="backslashreplace") if rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if data:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    dist.broadcast(buf, src=0)
    return _bytes(buf).decode()


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by torchrun and accelerate; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if distributed() else 0


def machine_union(flags: Sequence[bool]) -> list[bool]:
    """For each item, whether any process on this machine flagged it (a collective; every process passes as many
    flags). A machine is ``GROUP_RANK`` (torchrun's node rank) or, without it, the host name."""
    if not distributed():
        return list(flags)
    machine = os.environ.get("GROUP_RANK") or socket.gethostname()
    node = int.from_bytes(hashlib.sha256(machine.encode()).digest()[:7], "little")
    row = torch.tensor(
        [node, len(flags), *(int(bool(f)) for f in flags)], dtype=torch.int64, device=_device()
    )
    sizes = [torch.zeros(1, dtype=torch.int64, device=row.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([row.numel()], dtype=torch.int64, device=row.device))
    if len({int(s.item()) for s in sizes}) != 1:
        raise RuntimeError("the processes read different manifests (the revision moved between downloads)")
    rows = [torch.zeros_like(row) for _ in sizes]
    dist.all_gather(rows, row)
    same = [r[2:].cpu() for r in rows if int(r[0].item()) == node]
    return [bool(any(int(r[i].item()) for r in same)) for i in range(len(flags))]


def broadcast_id() -> str:
    """A new checkpoint id, chosen by rank 0 and known to every rank (no pickling)."""
    raw = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.uint8)
    if distributed():
        raw = raw.to(_device())
        dist.broadcast(raw, src=0)
    return _bytes(raw).hex()


def barrier() -> None:
    """A barrier over the default process group (nothing without one)."""
    if distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Naming and placing parameters
# ---------------------------------------------------------------------------------------------------------------


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Parameter name for each optimizer parameter, by ``id``; every optimizer parameter must be in ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_engine(model)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    missing = [
        i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in names
    ]
    if missing:
        raise ValueError(
            "the optimizer has parameters that are not in model (model= must be the trained model)"
        )
    return names


def local_region(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box (offsets, sizes) of a ``DTensor`` parameter's global tensor that this process holds, as
    ``torch.distributed.checkpoint`` plans it (``__create_chunk_list__``); None for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    chunks = param.__create_chunk_list__()
    local_shape = tuple(param.to_local().shape)
    if len(chunks) != 1 or tuple(chunks[0].sizes) != local_shape:  # pragma: no cover - not a DTensor layout
        raise ValueError(
            f"cannot place state like a DTensor parameter whose local part {list(local_shape)} is not one box "
            f"of its global shape {list(param.shape)} (placements {param.placements})"
        )
    return tuple(chunks[0].offsets), local_shape


def like_parameter(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap this process's part ``local`` of a tensor shaped like the ``DTensor`` ``param`` (see
    :func:`local_region`) as a ``DTensor`` placed like ``param`` (no communication)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        raise TypeError(f"expected a DTensor parameter, got {type(param).__name__}")
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
