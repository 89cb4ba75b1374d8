"""No process we start outlives us: the workers of the multi-process tokenization, killed with their
parent (SIGKILL, 9 s into `runner.py data` on 40,000 rows, as a user once did and found three
workers of 385 MB each still running 11 minutes later)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killing_data_preparation_leaves_no_worker_behind(tmp_path):
    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as out:
        for k in range(40_000):
            conversation = [
                {"role": "user", "content": f"Write a function that returns {k} squared, number {k}."},
                {"role": "assistant", "content": f"def f():\n    return {k} * {k}  # row {k}"},
            ]
            out.write(json.dumps({"messages": conversation}) + "\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "FINETUNE_CACHE": str(tmp_path / "cache"),
    }
    data = subprocess.Popen(
        [sys.executable, "runner.py", "data", "recipes/smoke.yaml", f"data.train={rows}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(data.pid)
    deadline = time.monotonic() + 300
    while len(workers := [c for c in parent.children(recursive=True) if alive(c)]) < 2:
        assert data.poll() is None, "finished before its workers were seen"
        assert time.monotonic() < deadline, "no tokenization workers in 300 s"
        time.sleep(0.05)
    time.sleep(1)  # into the tokenizing
    descendants = [c for c in parent.children(recursive=True) if alive(c)]
    assert len(descendants) >= len(workers) >= 2
    data.send_signal(signal.SIGKILL)
    data.wait()
    deadline = time.monotonic() + 10
    while (left := [c.pid for c in descendants if alive(c)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [(c.pid, c.cmdline()) for c in descendants if alive(c)]
    assert left == [], f"still running after their parent was killed: {survivors}"
