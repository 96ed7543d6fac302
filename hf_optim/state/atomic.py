"""Atomic updates of a checkpoint folder: temporary names, renames, ``-prev`` recovery copies, the save lock.

Every file is written into a staging folder ``.hf_optim-<checkpoint_id>.tmp/`` inside the checkpoint folder (so
that whatever the writers leave behind when killed stays in it) and renamed into place, the manifest last; a
companion file the checkpoint in place still uses is first renamed to ``.<name>.hf_optim-prev`` so that the
old checkpoint stays loadable until the manifest switches (``docs/FORMAT.md``, "Atomic saving").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hf_optim.errors import CheckpointError
from hf_optim.state.format import (
    LOCK_NAME,
    METADATA_KEY,
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    is_safe_name,
    parse_json,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # Windows: no fcntl, no cross-process lock

__all__ = [
    "Existing",
    "PendingFile",
    "commit",
    "existing_checkpoint",
    "file_checkpoint_id",
    "new_checkpoint_id",
    "prev_path",
    "read_checkpoint_id",
    "remove_leftovers",
    "save_lock",
    "staging_folder",
]

TMP_RE = re.compile(r"^\.(.+\.)?hf_optim-[0-9a-f]{32}\.tmp$")  # staging folders (and older temporary files)
PREV_SUFFIX = ".hf_optim-prev"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def new_checkpoint_id() -> str:
    return uuid.uuid4().hex


def prev_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{PREV_SUFFIX}")


def fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def checkpoint_id_of(raw: bytes, label: str) -> str | None:
    """The checkpoint id recorded in one of our files' bytes (JSON or safetensors, told apart by content)."""
    try:
        return read_checkpoint_id(raw, label)
    except CheckpointError:
        return None


def read_checkpoint_id(raw: bytes, label: str) -> str:
    """Like :func:`checkpoint_id_of`, but a file without a readable id is a :class:`CheckpointError` saying why."""
    try:
        if raw[:1] == b"{":  # scheduler.json or the index
            doc = parse_json(raw, label)
            if "weight_map" in doc:
                doc = doc["metadata"][METADATA_KEY]
            value = doc["checkpoint_id"]
        else:
            (n,) = struct.unpack("<Q", raw[:8])
            if n > _MAX_HEADER or len(raw) < 8 + n:
                raise CheckpointError(f"{label} is truncated or corrupted: bad header size {n}")
            header = parse_json(raw[8 : 8 + n], label)
            value = parse_json(header["__metadata__"][METADATA_KEY], label)["checkpoint_id"]
    except (KeyError, TypeError, IndexError, struct.error):
        raise CheckpointError(f"{label} is truncated or corrupted (it records no checkpoint id)") from None
    if not isinstance(value, str):
        raise CheckpointError(f"{label}: its checkpoint id is not a string")
    return value


def read_head(fd: int) -> bytes:
    """The bytes needed to find a file's checkpoint id: the whole JSON document, or the safetensors header."""
    head = os.pread(fd, 8, 0)
    if head[:1] == b"{":
        size = os.fstat(fd).st_size
        return os.pread(fd, min(size, _MAX_HEADER), 0)
    if len(head) < 8:
        return head
    (n,) = struct.unpack("<Q", head)
    return head + os.pread(fd, min(n, _MAX_HEADER), 8)


def file_checkpoint_id(path: str) -> str | None:
    """The checkpoint id recorded in a file (None if it has none, is unreadable or is not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if not _is_regular(fd):
            return None
        return checkpoint_id_of(read_head(fd), path)
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


@dataclass
class Existing:
    """The checkpoint currently in a directory (as far as its manifest says): id and the files it uses."""

    checkpoint_id: str
    files: set[str]


def existing_checkpoint(directory: str) -> Existing | None:
    """The checkpoint in ``directory``, or None when there is none or its manifest cannot be read."""
    for manifest in (OPTIMIZER_INDEX_NAME, OPTIMIZER_NAME):
        path = os.path.join(directory, manifest)
        if not os.path.lexists(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            if not _is_regular(fd):
                return None
            raw = read_head(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            if manifest == OPTIMIZER_INDEX_NAME:
                doc = parse_json(raw, path)
                meta = doc["metadata"][METADATA_KEY]
                files = {OPTIMIZER_INDEX_NAME, *doc["weight_map"].values()}
            else:
                (n,) = struct.unpack("<Q", raw[:8])
                meta = parse_json(parse_json(raw[8 : 8 + n], path)["__metadata__"][METADATA_KEY], path)
                files = {OPTIMIZER_NAME}
            for name in (meta.get("files") or {}).values():
                if isinstance(name, str):
                    files.add(name)
            checkpoint_id = meta["checkpoint_id"]
        except (CheckpointError, KeyError, TypeError, AttributeError, struct.error):
            return None
        if not isinstance(checkpoint_id, str):
            return None
        return Existing(checkpoint_id, {f for f in files if is_safe_name(f)})
    return None


@dataclass
class PendingFile:
    name: str
    write: Callable[[str], None]  #: writes the complete file at the given (temporary) path


@contextlib.contextmanager
def save_lock(directory: str) -> Iterator[None]:
    """Hold ``.hf_optim.lock`` in ``directory`` (``flock``): a second concurrent save fails at once.

    The kernel releases the lock when its holder dies, so a killed save never blocks the next one.
    """
    if fcntl is None:  # pragma: no cover - Windows: no locking
        yield
        return
    path = os.path.join(directory, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RuntimeError(
                    f"another process is saving into {directory} (it holds {path}); save from one process only"
                ) from None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


def follow_umask(folder: str, paths: list[str]) -> None:
    """Give ``paths`` the mode a new file gets under the process's umask (as ``open()`` and ``torch.save`` do):
    writers that create files through temporary-file helpers make them 0600. The mode is read from a probe file
    created in ``folder`` (``os.umask`` cannot be read without changing it for every thread)."""
    probe = os.path.join(folder, f".hf_optim-mode-{os.getpid()}-{id(paths)}.tmp")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.remove(probe)
    for path in paths:
        os.chmod(path, mode)


def staging_folder(directory: str, checkpoint_id: str) -> str:
    """A new, empty staging folder for one save's temporary files."""
    path = os.path.join(directory, f".hf_optim-{checkpoint_id}.tmp")
    os.mkdir(path)
    return path


def remove_leftovers(directory: str) -> None:
    """Delete the staging folders (and temporary files) of saves that were killed."""
    for entry in os.listdir(directory):
        if TMP_RE.match(entry):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def commit(
    directory: str, checkpoint_id: str, companions: list[PendingFile], manifest: PendingFile, fsync: bool
) -> list[str]:
    """Write files under temporary names, then rename: companions first, the manifest last (docs/FORMAT.md).

    The caller holds :func:`save_lock`.
    """
    remove_leftovers(directory)
    old = existing_checkpoint(directory)
    staging = staging_folder(directory, checkpoint_id)
    temps: dict[str, str] = {}
    try:
        for pending in [*companions, manifest]:
            tmp = os.path.join(staging, pending.name)
            temps[pending.name] = tmp
            pending.write(tmp)
        follow_umask(staging, list(temps.values()))
        for pending in companions:
            final = os.path.join(directory, pending.name)
            if (
                old is not None
                and pending.name in old.files
                and file_checkpoint_id(final) == old.checkpoint_id
            ):
                os.replace(final, prev_path(final))  # the previous checkpoint can still find it there
            os.replace(temps[pending.name], final)
            del temps[pending.name]
        index_path = os.path.join(directory, OPTIMIZER_INDEX_NAME)
        os.replace(temps[manifest.name], os.path.join(directory, manifest.name))
        del temps[manifest.name]
        if manifest.name == OPTIMIZER_NAME and os.path.lexists(index_path):
            # an index takes precedence over optimizer.safetensors: retiring it is the commit point
            os.replace(index_path, prev_path(index_path))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if fsync:
        fsync_directory(directory)

    # The new checkpoint is in place: drop recovery copies and files only the previous checkpoint used.
    written = {p.name for p in [*companions, manifest]}
    stale = set(old.files) - written if old is not None else set()
    for name in [*written, OPTIMIZER_INDEX_NAME, *stale]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(prev_path(os.path.join(directory, name)))
    for name in stale:
        path = os.path.join(directory, name)
        if old is not None and file_checkpoint_id(path) == old.checkpoint_id:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return [os.path.join(directory, name) for name in [*(p.name for p in companions), manifest.name]]
