"""Reading a checkpoint folder's structure: manifest, shards, companions, ids and metadata, all validated.

:func:`open_checkpoint` pins every file it reads to an open descriptor whose checkpoint id it checked, so the
tensors read later come from exactly those files even if a concurrent save renames new ones into place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.atomic import checkpoint_id_of, prev_path, read_checkpoint_id, read_head
from hf_optim.state.codec import TensorHeader, check_tensor_nodes, tensor_refs
from hf_optim.state.format import (
    KIND_OPTIMIZER,
    KIND_SHARD,
    METADATA_KEY,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    RESERVED_KEYS,
    check_metadata,
    is_safe_name,
    is_shape,
    parse_json,
)
from hf_optim.state.io import (
    OpenFile,
    SafetensorsFile,
    checkpoint_roots,
    open_file,
    read_flat_range,
    read_json,
    read_region,
    read_safetensors,
    read_tensors,
)

__all__ = ["Checkpoint", "encoded_values", "manifest_files", "open_checkpoint", "validate_optimizer_meta"]

_ATTEMPTS = 3


class _Changed(Exception):
    """A file's checkpoint id no longer matches the manifest read a moment ago: a save is in progress."""


class _Missing(_Changed):
    """A file the manifest lists is gone: a save retired it, unless the manifest still describes the same
    checkpoint (then the file really is missing)."""


@dataclass
class Checkpoint:
    """An open, validated checkpoint: its metadata, tensor headers and the descriptors they were read from."""

    directory: str
    manifest: str  #: file name
    meta: dict[str, Any]
    entries: dict[str, TensorHeader]  #: optimizer tensors by key
    files: list[str]  #: paths actually read
    roots: list[str]
    _manifest_file: OpenFile
    _manifest_head: bytes  #: the manifest's header (safetensors) or whole text (index) as first read
    _tensor_files: dict[str, SafetensorsFile] = field(default_factory=dict)  #: by path
    _companions: dict[str, OpenFile] = field(default_factory=dict)  #: by kind ("scheduler", "accumulator")
    _open: list[OpenFile] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The manifest's path (names the checkpoint in messages)."""
        return os.path.join(self.directory, self.manifest)

    @property
    def checkpoint_id(self) -> str:
        return self.meta["checkpoint_id"]

    def close(self) -> None:
        for f in self._open:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def companion(self, kind: str) -> OpenFile | None:
        """The scheduler / accumulator file of this checkpoint (opened and id-checked with it), or None."""
        return self._companions.get(kind)

    def read_tensors(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read optimizer tensors, file by file, then check that the manifest still records the same id."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.entries[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            out.update(read_tensors(self._tensor_files[path], names))
        self.check_unchanged()
        return out

    def read_regions(
        self, regions: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
    ) -> dict[str, torch.Tensor]:
        """Read one box (``offsets``, ``sizes``) of each given optimizer tensor, and only its bytes; then check
        that the manifest still records the same id."""
        out = {
            key: read_region(self._tensor_files[self.entries[key].file], key, offsets, sizes)
            for key, (offsets, sizes) in regions.items()
        }
        self.check_unchanged()
        return out

    def read_flat_range(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``[start, stop)`` of optimizer tensor ``key`` flattened, reading only their bytes (into
        ``out`` when given)."""
        return read_flat_range(self._tensor_files[self.entries[key].file], key, start, stop, out)

    def check_unchanged(self) -> None:
        """The manifest's descriptor still records this checkpoint's id (its file was not rewritten in place)."""
        if read_head(self._manifest_file.fd) != self._manifest_head:
            raise CheckpointError(f"{self._manifest_file.path}: the checkpoint changed while loading")


def _open_member(directory: str, name: str, checkpoint_id: str, manifest: str, roots: list[str]) -> OpenFile:
    """``name`` if it belongs to ``checkpoint_id``, else its recovery copy from an interrupted save."""
    path = os.path.join(directory, name)
    found_any = False
    unreadable: CheckpointError | None = None
    for candidate in (path, prev_path(path)):
        try:
            f = open_file(candidate, roots=roots)
        except FileNotFoundError:
            continue
        found_any = True
        file_id = None
        try:
            file_id = read_checkpoint_id(read_head(f.fd), candidate)
        except CheckpointError as err:
            if candidate == path:
                unreadable = err
        except OSError as err:
            if candidate == path:
                unreadable = CheckpointError(f"{candidate} cannot be read: {err.strerror}")
        if file_id == checkpoint_id:
            return f
        f.close()
    if not found_any:
        raise _Missing(f"{name} is listed by {manifest} but missing from {directory}", checkpoint_id)
    if unreadable is not None:
        raise unreadable
    raise _Changed(
        f"{name} in {directory} does not belong to the checkpoint described by {manifest} (different checkpoint "
        "id): the directory holds an incomplete save or files from different saves",
        checkpoint_id,
    )


def open_checkpoint(directory: str, *, roots: Iterable[str] | None = None) -> Checkpoint:
    """Open and validate the checkpoint in ``directory`` (files must resolve inside ``roots``, default it).

    A save running meanwhile makes it retry; if the folder keeps changing, a :class:`CheckpointError` says so.
    """
    root_list = checkpoint_roots(directory) if roots is None else list(roots)
    for _ in range(_ATTEMPTS):
        opened: list[OpenFile] = []
        try:
            return _read_structure(directory, root_list, opened)
        except _Changed as err:
            for f in opened:
                f.close()
            if _manifest_id(directory, root_list) == err.args[1]:
                if isinstance(err, _Missing) and err.args[1] is not None:
                    raise FileNotFoundError(err.args[0]) from None  # the manifest lists a file that is absent
                raise CheckpointError(err.args[0]) from None  # the files really are from different saves
        except BaseException:
            for f in opened:
                f.close()
            raise
    raise CheckpointError(
        f"the checkpoint in {directory} changed while loading (another process is saving into it); try again"
    )


def _manifest_id(directory: str, roots: list[str]) -> str | None:
    for name in (OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME):
        try:
            f = open_file(os.path.join(directory, name), roots=roots)
        except (FileNotFoundError, CheckpointError):
            continue
        try:
            return checkpoint_id_of(read_head(f.fd), f.path)
        finally:
            f.close()
    return None


def _open_manifest(path: str, directory: str, roots: list[str]) -> OpenFile:
    """Open the manifest seen a moment ago; gone meanwhile means a save retired it (retry)."""
    try:
        return open_file(path, roots=roots)
    except FileNotFoundError:
        raise _Missing(
            f"the checkpoint in {directory} changed while loading ({os.path.basename(path)} was removed by "
            "another save); try again",
            None,
        ) from None


def _read_structure(directory: str, roots: list[str], opened: list[OpenFile]) -> Checkpoint:
    index_path = os.path.join(directory, OPTIMIZER_INDEX_NAME)
    single_path = os.path.join(directory, OPTIMIZER_NAME)
    tensor_files: dict[str, SafetensorsFile] = {}
    if os.path.lexists(index_path):
        manifest_file = _open_manifest(index_path, directory, roots)
        opened.append(manifest_file)
        manifest_head = read_head(manifest_file.fd)
        index = parse_json(manifest_head, index_path)
        if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
            raise CheckpointError(f"{OPTIMIZER_INDEX_NAME} in {directory} has no 'metadata'")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{OPTIMIZER_INDEX_NAME} in {directory} has no 'weight_map'")
        meta = check_metadata(index["metadata"].get(METADATA_KEY), index_path, KIND_OPTIMIZER)
        for name in weight_map.values():
            if not is_safe_name(name) or not name.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index_path}: shard name {name!r} would leave the checkpoint directory "
                    "(expected a plain *.safetensors file name)"
                )
        entries: dict[str, TensorHeader] = {}
        files = [index_path]
        for name in sorted(set(weight_map.values())):
            f = _open_member(directory, name, meta["checkpoint_id"], OPTIMIZER_INDEX_NAME, roots)
            opened.append(f)
            shard = read_safetensors(f)
            shard_meta = check_metadata(shard.metadata.get(METADATA_KEY), f.path, KIND_SHARD)
            if (
                shard_meta["checkpoint_id"] != meta["checkpoint_id"]
            ):  # pragma: no cover - _open_member checked
                raise CheckpointError(f"{f.path}: checkpoint id differs from {OPTIMIZER_INDEX_NAME}")
            expected = {k for k, v in weight_map.items() if v == name}
            if set(shard.entries) != expected:
                extra = sorted(set(shard.entries) - expected)[:3]
                missing = sorted(expected - set(shard.entries))[:3]
                raise CheckpointError(
                    f"{f.path} does not hold the tensors {OPTIMIZER_INDEX_NAME} maps to it (missing {missing}, "
                    f"unexpected {extra})"
                )
            entries.update(shard.entries)
            tensor_files[f.path] = shard
            files.append(f.path)
        manifest = OPTIMIZER_INDEX_NAME
    elif os.path.lexists(single_path):
        manifest_file = _open_manifest(single_path, directory, roots)
        opened.append(manifest_file)
        manifest_head = read_head(manifest_file.fd)
        single = read_safetensors(manifest_file)
        meta = check_metadata(single.metadata.get(METADATA_KEY), single_path, KIND_OPTIMIZER)
        entries = dict(single.entries)
        tensor_files[single_path] = single
        files = [single_path]
        manifest = OPTIMIZER_NAME
    else:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no such checkpoint directory: {directory}")
        raise FileNotFoundError(
            f"no optimizer state in {directory}: expected {OPTIMIZER_NAME} or {OPTIMIZER_INDEX_NAME}"
        )
    validate_optimizer_meta(meta, entries, os.path.join(directory, manifest))
    companions: dict[str, OpenFile] = {}
    for kind, name in (meta.get("files") or {}).items():
        if name is None:
            continue
        if not is_safe_name(name):
            raise CheckpointError(
                f"{os.path.join(directory, manifest)}: file name {name!r} would leave the checkpoint directory"
            )
        f = _open_member(directory, name, meta["checkpoint_id"], manifest, roots)
        opened.append(f)
        companions[kind] = f
        files.append(f.path)
    return Checkpoint(
        directory,
        manifest,
        meta,
        entries,
        files,
        roots,
        manifest_file,
        manifest_head,
        tensor_files,
        companions,
        opened,
    )


def encoded_values(meta: Mapping[str, Any], state_keys: Iterable[str], *, groups: bool) -> list[Any]:
    """The optimizer metadata's encoded values: the state of ``state_keys``, the hyperparameters, ``extra``."""
    nodes = [{"dict": meta["state"][k]} for k in state_keys if k in meta["state"]]
    if groups:
        nodes += [{"dict": g["hyperparameters"]} for g in meta["param_groups"]]
    nodes.append({"dict": meta.get("extra") or {}})
    return nodes


def validate_optimizer_meta(meta: dict[str, Any], entries: Mapping[str, TensorHeader], label: str) -> None:
    """Check the metadata's structure and types, so that readers can rely on them (docs/FORMAT.md)."""
    groups = meta.get("param_groups")
    state = meta.get("state")
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or meta.get("keyed_by") not in ("name", "index")
    ):
        raise CheckpointError(f"{label}: metadata lacks param_groups / state / keyed_by")
    optimizer = meta.get("optimizer")
    if optimizer is not None and not (
        isinstance(optimizer, dict)
        and all(optimizer.get(k) is None or isinstance(optimizer[k], str) for k in ("class", "name"))
    ):
        raise CheckpointError(f"{label}: malformed metadata: 'optimizer' is {optimizer!r}")
    for part in ("extra", "files", "info"):
        if meta.get(part) is not None and not isinstance(meta[part], dict):
            raise CheckpointError(f"{label}: malformed metadata: {part!r} is {meta[part]!r}, not an object")
    info = meta.get("info") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
        raise CheckpointError(f"{label}: malformed metadata: 'info' must map strings to strings")
    reserved = sorted(RESERVED_KEYS & set(meta.get("extra") or {}))
    if reserved:
        raise CheckpointError(f"{label}: 'extra' has an entry named {reserved[0]!r}, which is reserved")
    keys: set[str] = set()
    for g, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{label}: param group {g} is malformed")
        if not isinstance(group.get("hyperparameters"), dict):
            raise CheckpointError(f"{label}: param group {g} has no hyperparameters")
        reserved = sorted(RESERVED_KEYS & set(group["hyperparameters"]))
        if reserved:
            raise CheckpointError(
                f"{label}: param group {g} has a hyperparameter named {reserved[0]!r}, which is reserved"
            )
        for rec in group["params"]:
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("index"), int)
                or isinstance(rec["index"], bool)
            ):
                raise CheckpointError(
                    f"{label}: param group {g} has a malformed parameter record {str(rec)[:200]}"
                )
            key = rec.get("name") if meta["keyed_by"] == "name" else str(rec["index"])
            if not isinstance(key, str) or key in keys:
                raise CheckpointError(f"{label}: parameter {key!r} is missing a name or listed twice")
            if not (rec.get("shape") is None or is_shape(rec["shape"])) or not (
                rec.get("dtype") is None or isinstance(rec["dtype"], str)
            ):
                raise CheckpointError(f"{label}: parameter {key!r} has a malformed shape or dtype in {rec!r}")
            keys.add(key)
    unknown = sorted(set(state) - keys)
    if unknown:
        raise CheckpointError(f"{label}: state for parameter {unknown[0]!r}, which is in no param group")
    for key, pstate in state.items():
        if not isinstance(pstate, dict):
            raise CheckpointError(
                f"{label}: malformed metadata: the state of parameter {key!r} is {pstate!r}"
            )
    tree = encoded_values(meta, state, groups=True)
    check_tensor_nodes(tree, entries, label)
    referenced = {ref["tensor"] for ref in tensor_refs(tree)}
    unreferenced = sorted(set(entries) - referenced)
    if unreferenced:
        raise CheckpointError(f"{label}: tensor {unreferenced[0]!r} is in the file but not in the metadata")


def manifest_files(path: str) -> list[str]:
    """The file names a manifest (``optimizer.safetensors`` or the index) references, itself included.

    Used to download exactly a checkpoint's files; names that would leave the folder are refused.
    """
    f = open_file(path, roots=checkpoint_roots(os.path.dirname(os.path.abspath(path))))
    try:
        if os.path.basename(path) == OPTIMIZER_INDEX_NAME:
            index = read_json(f)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{path} has no 'weight_map'")
            if not isinstance(index.get("metadata"), dict):
                raise CheckpointError(f"{path} has no 'metadata'")
            meta = check_metadata(index["metadata"].get(METADATA_KEY), path, KIND_OPTIMIZER)
            names = sorted(set(index["weight_map"].values()), key=str)
        else:
            meta = check_metadata(read_safetensors(f).metadata.get(METADATA_KEY), path, KIND_OPTIMIZER)
            names = []
    finally:
        f.close()
    companions = meta.get("files") or {}
    if not isinstance(companions, dict):
        raise CheckpointError(f"{path}: malformed metadata: 'files' is not an object")
    names += [name for name in companions.values() if name is not None]
    for name in names:
        if not is_safe_name(name):
            raise CheckpointError(f"{path}: file name {name!r} would leave the checkpoint directory")
    return [os.path.basename(path), *names]
