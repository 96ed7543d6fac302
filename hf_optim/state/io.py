"""Reading and writing the checkpoint's files: safetensors through the ``safetensors`` library, JSON by hand.

Reads are hardened: a file is opened once (no following of a last-component symlink, non-blocking so that a FIFO
cannot hang the reader), must be a regular file inside the checkpoint folder, and every later read (headers,
metadata, tensors) goes through that same descriptor (``/proc/self/fd/N`` for ``safe_open``), so a concurrent
save that renames new files into place cannot mix two checkpoints into one load.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hf_optim.errors import CheckpointError
from hf_optim.state.codec import TensorHeader
from hf_optim.state.format import parse_json

__all__ = [
    "OpenFile",
    "SafetensorsFile",
    "checkpoint_roots",
    "open_file",
    "read_json",
    "read_pickle_weights_only",
    "read_region",
    "read_safetensors",
    "read_tensors",
    "safetensors_header",
    "write_json",
    "write_safetensors",
    "write_safetensors_streaming",
]

_HAS_PROC_FD = os.path.isdir("/proc/self/fd")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
#: safetensors' ``Dtype`` enum order (ascending) for the dtypes above: a file lays its tensors out by descending
#: dtype, then by name, so that each tensor's data stays aligned
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32")
_DTYPE_RANK = {name: rank for rank, name in enumerate((*_DTYPE_ORDER, "C64", "F64", "I64", "U64"))}


@dataclass
class OpenFile:
    """A checked, open checkpoint file; ``path`` names it in messages, ``fd`` is what is read."""

    path: str
    fd: int
    st: os.stat_result

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reader_path(self) -> str:
        """A path that opens this descriptor's file, not whatever is at ``path`` now."""
        if _HAS_PROC_FD:
            return f"/proc/self/fd/{self.fd}"
        try:  # pragma: no cover - platforms without /proc
            now = os.stat(self.path)
        except OSError:  # pragma: no cover
            now = None
        if now is None or (now.st_dev, now.st_ino, now.st_mtime_ns) != (  # pragma: no cover
            self.st.st_dev,
            self.st.st_ino,
            self.st.st_mtime_ns,
        ):
            raise CheckpointError(
                f"{self.path} was replaced while loading: the checkpoint changed while loading"
            )
        return self.path  # pragma: no cover

    def read_all(self) -> bytes:
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(self.fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)


#: how the Hugging Face cache names a repository's folder (``models--user--name``)
_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def checkpoint_roots(directory: str) -> list[str]:
    """Folders a checkpoint's files may resolve into: the folder itself, and in a Hugging Face cache snapshot
    (``<repo>/snapshots/<commit>/...``, whose files link to ``<repo>/blobs/``; ``<repo>`` is named
    ``models--*`` / ``datasets--*`` / ``spaces--*``) that repository's ``blobs``."""
    roots = [directory]
    current = os.path.abspath(directory)
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return roots
        if os.path.basename(parent) == "snapshots":
            repo = os.path.dirname(parent)
            blobs = os.path.join(repo, "blobs")
            # no refs/ required: huggingface_hub writes none for a download pinned to a commit. The repository
            # folder and its blobs must be real folders: a symlinked one could make any folder a root.
            if os.path.basename(repo).startswith(_CACHE_REPO_PREFIXES) and all(
                _is_real_dir(path) for path in (repo, blobs)
            ):
                roots.append(blobs)
            return roots
        current = parent


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def open_file(path: str, *, roots: Iterable[str]) -> OpenFile:
    """Open a checkpoint file for reading: it must resolve inside one of ``roots`` and be a regular file.

    Raises ``FileNotFoundError`` when it does not exist and :class:`CheckpointError` (naming it) otherwise.
    """
    real = os.path.realpath(path)
    real_roots = [os.path.realpath(r) for r in roots]
    if not _inside(real, real_roots):
        raise CheckpointError(f"{path} is a link to {real}, outside the checkpoint folder: refused")
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file {path}") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be opened: {err.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file: refused")
    return OpenFile(path, fd, st)


def read_pickle_weights_only(file: OpenFile, what: str, *, allowed: Iterable[Any] = ()) -> Any:
    """A torch pickle of an older checkpoint (``pytorch_model.bin``, ``random_states_N.pkl``), read from the
    checked descriptor with ``torch.load(weights_only=True)``: tensors, plain containers and the ``allowed``
    globals only. Any failure, a refused global included, is a :class:`CheckpointError` naming the file and
    ``what`` it should hold."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(io.BytesIO(file.read_all()), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for refused or malformed pickles
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{file.path}: not {what} readable with torch.load(weights_only=True): {first}"
        ) from None


def read_json(file: OpenFile) -> Any:
    """Parse a JSON file of the checkpoint (the index, ``scheduler.json``) from its descriptor."""
    return parse_json(file.read_all(), file.path)


@dataclass
class SafetensorsFile:
    """A safetensors file's validated header: ``__metadata__`` and each tensor's dtype and shape."""

    file: OpenFile
    metadata: dict[str, str]
    entries: dict[str, TensorHeader] = field(default_factory=dict)
    #: where each tensor's bytes start in the file (safetensors stores them contiguously, in offset order)
    starts: dict[str, int] = field(default_factory=dict)


def read_safetensors(file: OpenFile) -> SafetensorsFile:
    """Read and validate a safetensors header with the ``safetensors`` library (through ``file``'s descriptor)."""
    entries: dict[str, TensorHeader] = {}
    try:
        with safe_open(file.reader_path(), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(key)
                dtype = _DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{file.path}: tensor {key!r} has unsupported dtype {piece.get_dtype()}"
                    )
                shape = tuple(piece.get_shape())
                numel = 1
                for d in shape:
                    numel *= d
                entries[key] = TensorHeader(file.path, dtype, shape, numel * dtype.itemsize)
            order = f.offset_keys()
        starts = _tensor_starts(file, order, entries)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{file.path} is truncated or corrupted: {err}") from None
    return SafetensorsFile(file, dict(metadata), entries, starts)


def _tensor_starts(file: OpenFile, order: list[str], entries: Mapping[str, TensorHeader]) -> dict[str, int]:
    """Each tensor's first byte in the file. ``safetensors`` accepts only headers whose tensors tile the data
    section without gap or overlap, in ``offset_keys()`` order, so the offsets follow from the header's length
    (the file's first 8 bytes) and the tensors' sizes; that the last one ends at the end of the file is checked."""
    head = os.pread(file.fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{file.path} is truncated or corrupted: no header")
    position = 8 + struct.unpack("<Q", head)[0]
    starts = {}
    for key in order:
        starts[key] = position
        position += entries[key].nbytes
    if position != os.fstat(file.fd).st_size:
        raise CheckpointError(
            f"{file.path} is truncated or corrupted: its tensors do not end where the file does"
        )
    return starts


def read_tensors(st: SafetensorsFile, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the given tensors eagerly (``backend="pread"``) through the checked descriptor."""
    keys = list(keys)
    if not keys:
        return {}
    try:
        with safe_open(st.file.reader_path(), framework="pt", backend="pread") as f:
            return {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{st.file.path} is truncated or corrupted: {err}") from None


def read_region(
    st: SafetensorsFile, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]
) -> torch.Tensor:
    """The box ``[offsets, offsets + sizes)`` of tensor ``key``, reading only its bytes (one ``pread`` per
    contiguous run: a block of rows is one) through the checked descriptor.

    ``safe_open(..., backend="pread").get_slice(key)[region]`` reads the whole tensor before slicing it, and the
    ``mmap`` backend maps the file (a concurrent truncation would kill the process with SIGBUS), hence the
    explicit reads at the offsets the library validated (see :attr:`SafetensorsFile.starts`)."""
    entry = st.entries[key]
    shape = entry.shape
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise ValueError(
            f"region {list(offsets)} + {list(sizes)} does not match shape {list(shape)} of {key!r}"
        )
    if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
        raise ValueError(
            f"region {list(offsets)} + {list(sizes)} lies outside shape {list(shape)} of {key!r}"
        )
    out = torch.empty(sizes, dtype=entry.dtype)
    if out.numel() == 0:
        return out
    itemsize = entry.dtype.itemsize
    # the innermost dimensions the box spans whole, plus the one before them, form contiguous runs
    inner = len(shape)
    while inner > 0 and sizes[inner - 1] == shape[inner - 1]:
        inner -= 1
    run_dims = max(inner - 1, 0)
    run = math.prod(sizes[run_dims:])
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    buffer = out.view(-1).view(torch.uint8).numpy().data
    base = st.starts[key] + sum(o * s for o, s in zip(offsets, strides, strict=True)) * itemsize
    for i, index in enumerate(itertools.product(*(range(n) for n in sizes[:run_dims]))):
        first = base + sum(j * s for j, s in zip(index, strides, strict=False)) * itemsize
        _pread_into(st.file, buffer[i * run * itemsize : (i + 1) * run * itemsize], first)
    return out


def read_flat_range(
    st: SafetensorsFile, key: str, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Elements ``[start, stop)`` of tensor ``key`` flattened (1-D), reading only their bytes (one ``pread``),
    into ``out`` (a contiguous CPU tensor of that size and dtype) when given."""
    entry = st.entries[key]
    numel = math.prod(entry.shape)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) lies outside the {numel} elements of {key!r}")
    if out is None:
        out = torch.empty(stop - start, dtype=entry.dtype)
    elif out.dtype != entry.dtype or out.numel() != stop - start or not out.is_contiguous() or out.is_cuda:
        raise ValueError(f"out must be a contiguous CPU {entry.dtype} tensor of {stop - start} elements")
    if out.numel():
        buffer = out.view(torch.uint8).numpy().data
        _pread_into(st.file, buffer, st.starts[key] + start * entry.dtype.itemsize)
    return out


def _pread_into(file: OpenFile, target: memoryview, position: int) -> None:
    done = 0
    while done < len(target):
        try:
            count = os.preadv(file.fd, [target[done:]], position + done)
        except OSError as err:
            raise CheckpointError(f"{file.path} cannot be read: {err.strerror}") from None
        if count == 0:
            raise CheckpointError(f"{file.path} is truncated or corrupted: it ended while reading a tensor")
        done += count


def write_safetensors(
    path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, fsync: bool
) -> None:
    """Write a safetensors file with ``safetensors.torch.save_file`` (CPU, contiguous, no shared memory)."""
    prepared: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if storage in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # save_file refuses tensors sharing memory (also views into a larger storage)
            seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        prepared[key] = t
    save_file(prepared, path, metadata=dict(metadata))
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def safetensors_header(
    specs: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[str]]:
    """The bytes a safetensors file starts with (header size, JSON header, padding) for tensors of the dtypes and
    shapes of ``specs`` (any device, ``meta`` included), and the order their data follows it in.

    Laid out as ``safetensors`` lays it out: tensors by descending dtype (its ``Dtype`` order), then by name;
    ``__metadata__`` first, in the given order; compact JSON, non-ASCII kept as UTF-8; padded with spaces to a
    multiple of 8 bytes.
    """
    entries = []
    for key, spec in specs.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be strings, got {key!r}")
        name = _DTYPE_NAMES.get(spec.dtype)
        if name is None:
            raise TypeError(f"{key}: tensors of dtype {spec.dtype} cannot be stored in safetensors")
        entries.append((-_DTYPE_RANK[name], key.encode("utf-8"), key, name, [int(d) for d in spec.shape]))
    entries.sort(key=lambda e: (e[0], e[1]))
    doc: dict[str, Any] = {}
    if metadata is not None:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for _, _, key, name, shape in entries:
        nbytes = _DTYPES[name].itemsize
        for d in shape:
            nbytes *= d
        doc[key] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, [e[2] for e in entries]


def write_safetensors_streaming(
    path: str,
    specs: Mapping[str, torch.Tensor],
    fill: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None,
    *,
    fsync: bool,
) -> None:
    """Write a safetensors file one tensor at a time: ``fill(key)`` builds each tensor when its turn comes and
    it is dropped once written, so at most one of them is alive here.

    ``specs`` gives each tensor's dtype and shape (``meta``-device tensors do); the file is byte for byte what
    ``safetensors.torch.save_file`` writes for the same tensors and metadata (that library has no incremental
    writer). A tensor ``fill`` returns must have its spec's dtype and shape.
    """
    header, order = safetensors_header(specs, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for key in order:
            tensor = fill(key)
            spec = specs[key]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{key}: fill returned {type(tensor).__name__}, not a tensor")
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise ValueError(
                    f"{key}: fill returned a {tensor.dtype} tensor of shape {list(tensor.shape)}, expected "
                    f"{spec.dtype} of shape {list(spec.shape)}"
                )
            if tensor.numel():
                f.write(_raw_bytes(tensor))
            del tensor
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def allocate_safetensors(
    path: str, specs: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> dict[str, int]:
    """Create the safetensors file ``path`` at its full size (the header of ``specs``' dtypes and shapes, then
    zeros) for data written afterwards in any order with :func:`write_tensor_at`; returns where each tensor's
    data starts in the file."""
    header, order = safetensors_header(specs, metadata)
    starts, position = {}, len(header)
    for key in order:
        starts[key] = position
        position += specs[key].numel() * specs[key].element_size()
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(position)
    return starts


def write_tensor_at(fd: int, position: int, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s data bytes at ``position`` of the file open at ``fd`` (no copy when contiguous)."""
    data = _raw_bytes(tensor)
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's data bytes, as safetensors stores them (no copy for a contiguous CPU tensor)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1).view(torch.uint8)
    return t.numpy().data.cast("B")


def write_json(path: str, doc: Any, *, fsync: bool) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
