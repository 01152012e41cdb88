"""Small file helpers shared by the data cache, the checkpoints, the lab and the kernels' build:
checksums, atomic writes (a temporary file in the same folder, flushed to disk, then renamed
over the target, so a reader sees the old file or the new one, never half of one) and
inter-process locks (``filelock``: the lock dies with the process holding it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock

__all__ = [
    "sha256_file",
    "check_folder_path",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json_atomic",
    "file_lock",
    "LockBusy",
    "HeldLock",
]


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def check_folder_path(path: str | Path, what: str = "folder") -> None:
    """Raise ValueError (one line) when ``path`` cannot be a folder: it is an existing file, or a
    path under one. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
            break


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; when the block succeeds, the file written
    there is flushed to disk and renamed onto ``path`` (keeping the mode of a file it replaces).
    On any error, and on exit in any case, no temporary file is left behind."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Replace ``path`` by ``obj`` as JSON (indented, keys sorted) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


class LockBusy(RuntimeError):
    """Another process holds the lock (and the caller asked not to wait, or waited long enough)."""


class HeldLock:
    """A lock that :func:`file_lock` obtained; released by ``release()`` or at the end of a
    ``with`` block."""

    def __init__(self, lock: filelock.BaseFileLock) -> None:
        self._lock = lock

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def file_lock(path: str | Path, *, timeout: float | None = None) -> HeldLock:
    """Take an exclusive lock on ``path`` (created if missing) and return it held (use it in a
    ``with`` block). The lock is an OS lock on an open file, so it is released when the holder
    exits, however it exits (a killed process never leaves it behind). ``timeout=None`` waits as
    long as it takes, ``0`` does not wait; a lock not obtained in time raises :class:`LockBusy`
    (OSError when the lock file cannot be created)."""
    # UnixFileLock is an fcntl lock: never a "soft" lock file that a killed holder would leave
    kind = filelock.UnixFileLock if os.name == "posix" else filelock.FileLock
    lock = kind(str(path), timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockBusy(f"{path} is locked by another process") from None
    return HeldLock(lock)
