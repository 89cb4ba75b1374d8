"""Locks between processes, on lock files with flock(2): the kernel releases a lock however its
holder ends, SIGKILL included, so a lock never outlives its process and never needs cleaning up.

Three uses: a run folder is held by the process training it (a second `resume` of it is refused);
a prepared-data store is held (shared) by every process that opened it, so evicting old stores
skips one in use; and building a store is exclusive, so two processes preparing the same data
build it once (the second waits, then opens what the first built).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, int] = {}  # lock files held until this process ends: path -> open descriptor


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def hold(path: Path, shared: bool = False, wait: bool = False) -> bool:
    """Take the lock on ``path`` until this process ends (or release); False when another process
    holds it (unless ``wait``, which blocks until it is free). The holder's pid is written in the
    file for an exclusive lock, so a refusal can name it."""
    if str(path) in _HELD:
        return True
    fd = _open(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return False
    if not shared:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    _HELD[str(path)] = fd
    return True


def release(path: Path) -> None:
    fd = _HELD.pop(str(path), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def holder(path: Path) -> str:
    """The pid an exclusive holder wrote, or '?'."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def exclusive(path: Path):
    """Hold ``path`` exclusively for the block, waiting for any other holder first."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
