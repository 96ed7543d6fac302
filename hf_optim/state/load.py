"""Loading checkpoints: ``load_state`` (into live objects, all-or-nothing, any layout), ``load_state_dict`` (a
validated torch-format dict), ``load_object_state`` and ``has_state``.

``load_state`` opens the layout's reader (single-process files or FSDP2 shards), checks the decoded checkpoint
against the live objects (:func:`hf_optim.state.plan.check`), reads the tensors it needs and applies them
(:func:`hf_optim.state.plan.apply`). When every process takes part (an FSDP2 optimizer, or sharded files), the
processes agree on each step's verdict and on a digest of what they restore, so they fail or succeed together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from hf_optim._utils import clean_subfolder, unwrap_engine, unwrap_optimizer
from hf_optim.errors import CheckpointError
from hf_optim.state import sharded, zero
from hf_optim.state.codec import check_tensor_nodes, decode, tensor_refs
from hf_optim.state.describe import FileReader
from hf_optim.state.format import KIND_OBJECT, METADATA_KEY, check_metadata
from hf_optim.state.io import checkpoint_roots, open_file, read_safetensors, read_tensors
from hf_optim.state.model import LoadReport, Reader, TensorEntry
from hf_optim.state.plan import Live, LoadPlan, apply, check
from hf_optim.state.reader import open_checkpoint

__all__ = [
    "LoadReport",
    "has_state",
    "load_object_state",
    "load_state",
    "load_state_dict",
    "load_with",
]

#: longest error text the processes exchange (a message may quote names read from a hostile file)
_AGREED_TEXT = 2000


def load_state(
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    accumulator: Any = None,
    *,
    subfolder: str | None = None,
    strict: bool = True,
    roots: Iterable[str] | None = None,
    model: torch.nn.Module | None = None,
) -> LoadReport:
    """Restore state saved by :func:`save_state` from a local directory (``hf_optim.load_state`` adds the Hub).

    Everything is validated (format version, files, parameter names, group structure, shapes, dtypes, the
    hyperparameters' and scheduler state's types and values) before the optimizer, scheduler or accumulator is
    touched; on any error they are left exactly as they were. State tensors are placed on their parameter's
    device with their saved dtype; hyperparameters and the scheduler's position are restored, so training
    continues bit for bit. With ``strict=False`` the matching part is loaded and the :class:`LoadReport` lists
    the rest (and one warning summarises it). ``roots``: folders the checkpoint's files may resolve into through
    symlinks (default: the checkpoint folder itself).

    ``model``: the trained model. With a plain model it names the parameters (when the optimizer was not given
    ``named_parameters()``). It is required for sharded state: a sharded checkpoint (``optimizer.sharded.json``)
    loads on any number of processes, or into a plain single-process model; an FSDP2 optimizer (``DTensor``
    parameters) also loads an ordinary checkpoint, each process reading only its own shard of the state tensors.
    Call it on every process then.

    Args:
        directory: The checkpoint's local folder.
        optimizer: The optimizer to restore.
        scheduler: A learning-rate scheduler to restore too.
        accumulator: A :class:`~hf_optim.GradientAccumulator` to restore too.
        subfolder: A folder inside ``directory`` holding the state.
        strict: Refuse any difference between checkpoint and optimizer; ``False`` loads the matching part.
        roots: Folders the checkpoint's files may resolve into through symlinks.
        model: The trained model (names the parameters; required for sharded state).

    Returns:
        What was restored and what was skipped.

    Raises:
        FileNotFoundError: If there is no such folder or no optimizer state in it.
        CheckpointError: If a file is truncated, corrupted, hostile or inconsistent, or (``strict``) the state
            does not match the optimizer, scheduler or accumulator. Nothing has changed then.
        ValueError: If a sharded (FSDP2, DeepSpeed ZeRO) optimizer is given without ``model``, or a DeepSpeed ZeRO
            optimizer with an ``accumulator``.

    Example:
        ```python
        import torch
        import hf_optim
        from hf_optim.state import load_state

        model = torch.nn.Linear(2, 2)
        hf_optim.save_state("ckpt", hf_optim.AdamW(model.parameters()), model=model)
        assert load_state("ckpt", hf_optim.AdamW(model.parameters()), model=model).complete
        ```
    """
    directory = os.fspath(directory)
    sub = clean_subfolder(subfolder)
    directory = os.path.join(directory, *sub.split("/")) if sub else directory
    zero_optimizer = zero.find_zero(optimizer, model)
    if zero_optimizer is not None:
        return _load_into_zero(directory, scheduler, accumulator, model, zero_optimizer, roots, strict)
    opt = unwrap_optimizer(optimizer)
    is_sharded = sharded.is_sharded(opt)
    manifest = os.path.join(
        directory, sharded.SHARDED_MANIFEST_NAME
    )  # any kind of file: the reader checks it
    use_shards = os.path.lexists(manifest) and (is_sharded or not has_state(directory))
    sharded.require_model(opt, model, directory if use_shards else None)
    live = Live(
        opt,
        scheduler,
        accumulator,
        names=sharded.parameter_names(model, opt) if model is not None else None,
        model_params=dict(unwrap_engine(model).named_parameters()) if model is not None else {},
    )
    if use_shards:
        # format version 3 (element ranges, as ZeRO writes them) or 2 (FSDP2's row blocks)
        reader = zero.RangeReader if zero.is_range_layout(directory) else sharded.ShardedReader
        return load_with(lambda: reader(directory), live, strict, collective=True)

    @contextlib.contextmanager
    def open_files() -> Iterator[Reader]:
        with open_checkpoint(directory, roots=roots) as ckpt:
            yield FileReader(ckpt)

    return load_with(open_files, live, strict, collective=is_sharded)


def _load_into_zero(
    directory: str,
    scheduler: Any,
    accumulator: Any,
    model: torch.nn.Module | None,
    zero_optimizer: Any,
    roots: Iterable[str] | None,
    strict: bool,
) -> LoadReport:
    """Any checkpoint of the family (or a single-process one) into DeepSpeed ZeRO's flat partitions: checked
    like every load against the client optimizer seen per parameter, read by element ranges."""
    if model is None:
        raise ValueError("the optimizer is DeepSpeed ZeRO's: pass model= (the engine) to name its parameters")
    if accumulator is not None:
        raise ValueError(
            "a GradientAccumulator is not loaded with ZeRO state: DeepSpeed accumulates gradients"
        )

    def open_plan() -> zero.Plan:
        if sharded.has_sharded_state(directory) or not has_state(directory):
            return zero.read_manifest(directory)
        ckpt = open_checkpoint(directory, roots=roots)
        try:
            return zero.plan_from_checkpoint(ckpt, FileReader(ckpt).scheduler())
        except BaseException:
            ckpt.close()
            raise

    layout = zero.zero_layout(zero_optimizer, model)
    view, names = zero.zero_view(layout)
    live = Live(view, scheduler, names=names)
    reader = zero.RangeReader(directory, open_plan)
    return load_with(lambda: reader, live, strict, collective=True, into=zero.ZeroInstall(layout, model))


def load_with(
    open_reader: Callable[[], contextlib.AbstractContextManager[Reader]],
    live: Live,
    strict: bool,
    *,
    collective: bool,
    into: Any = None,
) -> LoadReport:
    """Load through a layout's reader: describe, :func:`~hf_optim.state.plan.check`, read, apply.

    ``collective``: every process calls this together; each step ends with the processes agreeing on its verdict
    (any process's error is raised on all of them), and before reading they check that they restore the same
    non-tensor values (a digest of them) from the same save. ``into``: a target that reads and installs the
    checked plan itself (:class:`~hf_optim.state.zero.ZeroInstall`, ZeRO's flat partitions) in place of the
    optimizer's own ``load_state_dict``."""
    with open_reader() as reader:
        plan = _step(
            collective, lambda: check(reader.describe(), live, strict), "the checkpoint does not fit"
        )
        if collective:
            digest = _digest(plan)
            first = sharded.broadcast_text(digest)
            _agreed(
                None
                if first == digest
                else f"{plan.saved.directory}: this process would restore other values than rank 0 (checkpoint "
                f"{plan.saved.checkpoint_id}): the processes read different saves or have different optimizers"
            )
        if into is not None:
            staged = _step(collective, lambda: into.stage(plan, reader), "reading the tensors failed")
            return into.apply(plan, staged)
        _step(collective, lambda: reader.prepare(plan.reads), "opening the tensor files failed")
        tensors = _step(collective, lambda: reader.read(plan.reads), "reading the tensors failed")
    return apply(plan, tensors)


def _step(collective: bool, run: Callable[[], Any], failure: str) -> Any:
    if not collective:
        return run()
    result = error = None
    try:
        result = run()
    except (CheckpointError, ValueError) as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{failure} ({type(exc).__name__}: {exc})"
    _agreed(error)
    return result


def _agreed(error: str | None) -> None:
    """Raise on every process if any of them met an error (its text bounded)."""
    if error is not None and len(error) > _AGREED_TEXT:
        error = error[:_AGREED_TEXT] + f"... ({len(error) - _AGREED_TEXT} more characters)"
    agreed = sharded.agree(error)
    if agreed is not None:
        raise CheckpointError(agreed)


def _digest(plan: LoadPlan) -> str:
    """A digest of everything non-tensor the plan restores (tensors by key, shape and dtype)."""

    def plain(value: Any) -> Any:
        if isinstance(value, TensorEntry):
            return ["tensor", value.key, list(value.shape), str(value.dtype)]
        if isinstance(value, torch.Tensor):
            return [
                "tensor",
                list(value.shape),
                str(value.dtype),
                value.tolist() if value.numel() == 1 else None,
            ]
        return repr(value)

    sd = plan.state_dict
    restored = {
        "id": plan.saved.checkpoint_id,
        "loaded": sorted((int(i), k) for i, k in plan.loaded.items()),
        "state": [sd["state"][i] for i in sorted(plan.loaded) if i in sd["state"]],
        "groups": [
            {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]
        ],
        "scheduler": plan.scheduler_state,
        "accumulator": plan.accumulator_state,
    }
    text = json.dumps(restored, default=plain)
    return hashlib.sha256(text.encode(errors="backslashreplace")).hexdigest()


def load_state_dict(
    directory: str | os.PathLike[str], *, roots: Iterable[str] | None = None
) -> dict[str, Any]:
    """The checkpoint's optimizer state as a torch-format ``state_dict`` (validated; keys are torch's indices).

    ``param_names`` are included when the state is keyed by name. No live optimizer is needed or checked: for
    tools that convert or compare state.

    Args:
        directory: The checkpoint's local folder.
        roots: Folders the checkpoint's files may be in (default: ``directory`` only).

    Returns:
        ``{"state": {index: {key: value}}, "param_groups": [...]}``, as ``Optimizer.state_dict()`` returns it.

    Raises:
        FileNotFoundError: If there is no such folder or no optimizer state in it.
        CheckpointError: If a file is truncated, corrupted, inconsistent or of an unknown format.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = hf_optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.01)
        hf_optim.save_state("ckpt", optimizer)
        assert hf_optim.load_state_dict("ckpt")["param_groups"][0]["lr"] == 0.01
        ```
    """
    directory = os.fspath(directory)
    with open_checkpoint(directory, roots=roots) as ckpt:
        meta = ckpt.meta
        tensors = ckpt.read_tensors(list(ckpt.entries))
        groups, state = [], {}
        for g, group in enumerate(meta["param_groups"]):
            hyper = decode({"dict": group["hyperparameters"]}, tensors, f"{ckpt.path}: param group {g}")
            out = {**hyper, "params": [rec["index"] for rec in group["params"]]}
            if meta["keyed_by"] == "name":
                out["param_names"] = [rec["name"] for rec in group["params"]]
            groups.append(out)
            for rec in group["params"]:
                key = rec["name"] if meta["keyed_by"] == "name" else str(rec["index"])
                if key in meta["state"]:
                    state[rec["index"]] = {
                        k: decode(v, tensors, f"{ckpt.path}: state of {key!r}")
                        for k, v in meta["state"][key].items()
                    }
        result: dict[str, Any] = {"state": state, "param_groups": groups}
        for k, node in (meta.get("extra") or {}).items():
            result[k] = decode(node, tensors, f"{ckpt.path}: extra {k!r}")
        return result


def load_object_state(path: str | os.PathLike[str], *, kind: str) -> Any:
    """Read a value saved by :func:`save_object_state`; the file must record the same ``kind``.

    Args:
        path: The file to read.
        kind: What the value must be (as given when saving).

    Returns:
        The value tree (tensors, numbers, str, None, lists, tuples and dicts of them).

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file records another kind, or is corrupted or hostile.

    Example:
        ```python
        import hf_optim

        hf_optim.save_object_state("counters.safetensors", {"seen": 128}, kind="counters")
        assert hf_optim.load_object_state("counters.safetensors", kind="counters") == {"seen": 128}
        ```
    """
    path = os.fspath(path)
    f = open_file(path, roots=checkpoint_roots(os.path.dirname(os.path.abspath(path))))
    try:
        st = read_safetensors(f)
        meta = check_metadata(st.metadata.get(METADATA_KEY), path, KIND_OBJECT)
        if meta.get("kind") != kind:
            raise CheckpointError(f"{path} holds {meta.get('kind')!r} state, not {kind!r}")
        check_tensor_nodes(meta.get("value"), st.entries, path)
        refs = {r["tensor"] for r in tensor_refs(meta.get("value"))}
        if set(st.entries) != refs:
            raise CheckpointError(f"{path}: the tensors in the file do not match its metadata")
        return decode(meta.get("value"), read_tensors(st, list(st.entries)), path)
    finally:
        f.close()


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete, consistent hf_optim optimizer checkpoint (headers checked only).

    A cheap test before resuming: it never raises for a missing or broken checkpoint.

    Args:
        directory: The folder to look into.

    Returns:
        True if a load would find the files it needs and their headers agree.

    Example:
        ```python
        import torch
        import hf_optim

        assert not hf_optim.has_state("ckpt")
        hf_optim.save_state("ckpt", hf_optim.AdamW(torch.nn.Linear(2, 2).parameters()))
        assert hf_optim.has_state("ckpt")
        ```
    """
    try:
        with open_checkpoint(os.fspath(directory)):
            return True
    except (OSError, ValueError):
        return False
