"""Processes we start die with us: a subprocess started with child_setup (llama.cpp's converter,
the device-speed probe, a sandboxed program, torchrun) and a process a library forks inside
children_die_with_us (datasets' workers), each killed with its parent's SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

PARENT = """
import os, subprocess, sys, time
from finetune.base.processes import child_setup, children_die_with_us
if sys.argv[1] == "subprocess":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=child_setup())
    print(child.pid, flush=True)
else:
    with children_die_with_us():
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
    print(pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["subprocess", "fork"])
def test_a_child_is_killed_with_its_parent(how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert not gone(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the {how} child outlived its parent")


def test_a_fork_outside_the_block_is_left_alone():
    code = (
        "import os, time\nfrom finetune.base.processes import children_die_with_us\n"
        "with children_die_with_us():\n    pass\n"
        "pid = os.fork()\nif pid == 0:\n    time.sleep(3); os._exit(0)\nprint(pid, flush=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.wait()
    time.sleep(0.5)
    assert not gone(child)  # forked after the block: not tied to the parent
    os.kill(child, signal.SIGKILL)
