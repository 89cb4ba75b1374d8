"""Child processes that die with their parent.

A worker of the multi-process tokenization, llama.cpp's converter or a device-speed probe goes on
after its parent is killed with SIGKILL unless told otherwise: seen as three tokenization workers of
385 MB each still running 11 minutes after `runner.py data` was killed. On Linux the kernel can send
a child a signal when its parent dies (prctl PR_SET_PDEATHSIG); every process we start asks for it:
a subprocess through its preexec_fn (child_setup), and the processes a library forks for us
(datasets' worker pool and the manager process beside it) through a fork hook (children_die_with_us).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1
_asked: set[int] = set()  # the processes (pids) that already asked, so a worker asks once


def _prctl():
    """libc's prctl, looked up once per process: a preexec_fn must not load libraries after fork
    in a process with threads (the loader's lock may be held by a thread that no longer exists)."""
    global _PRCTL
    if _PRCTL is None:
        import ctypes

        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    return _PRCTL


_PRCTL = None


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Called in a child: the kernel sends it ``sig`` when its parent dies. When ``parent`` (the
    pid that started it) is no longer the parent, the parent died before this was set: exit now."""
    if os.getpid() in _asked or not sys.platform.startswith("linux"):
        return
    _prctl()(_PR_SET_PDEATHSIG, sig)
    _asked.add(os.getpid())
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def child_setup(sig: int = signal.SIGKILL):
    """A subprocess preexec_fn for a child of this process (it runs in the child between fork and
    exec, and the death signal stays set across exec)."""
    parent = os.getpid()
    if sys.platform.startswith("linux"):
        _prctl()  # looked up here, in the parent
    return lambda: die_with_parent(parent, sig)


_forking_parent: int | None = None  # set while children_die_with_us is active
_hooked = False


def _after_fork_in_child() -> None:
    global _forking_parent
    if _forking_parent is not None:
        die_with_parent(_forking_parent)
        _forking_parent = os.getpid()  # what this child forks in turn dies with it


@contextmanager
def children_die_with_us():
    """Every process forked inside the block, by us or a library, is killed when this process
    dies (only inside it: a child forked by a thread that then ends would get the signal too)."""
    global _forking_parent, _hooked
    if not _hooked and sys.platform.startswith("linux"):
        _prctl()
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
    _forking_parent = os.getpid()
    try:
        yield
    finally:
        _forking_parent = None
