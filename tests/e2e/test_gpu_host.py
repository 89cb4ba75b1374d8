"""A GPU host torch cannot use is refused in one sentence, before any run folder exists.

The machine here has no GPU: a stand-in nvidia-smi lists one (with an old driver), and torch, a CUDA
13 build, then cannot use it, which is what a first run on a host with an outdated driver meets."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_gpu_that_torch_cannot_use_is_one_sentence_and_no_run_folder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "0, GPU-5f2b8c1e, NVIDIA GeForce RTX 4090, 24564, 24000, 535.104.05"\n')
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = tmp_path / "runs"
    out = subprocess.run(
        [sys.executable, "runner.py", "recipes/smoke.yaml", f"output.dir={runs}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "nvidia-smi lists NVIDIA GeForce RTX 4090 (driver 535.104.05), but torch 2.14.1" in stderr
    assert "(built for CUDA 13.0) cannot use it" in stderr and "needs driver 580.65.06 or newer" in stderr
    assert not runs.exists()


def test_a_machine_unsloth_refuses_is_one_sentence_and_no_run_folder(tmp_path):
    """Unsloth decides its device when imported and raises NotImplementedError where a GPU driver is
    loaded but torch cannot use it. UNSLOTH_DISABLE_CPU_FALLBACK=1 takes the same branch here."""
    runs = tmp_path / "runs"
    env = {**os.environ, "UNSLOTH_DISABLE_CPU_FALLBACK": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "runner.py", "recipes/smoke.yaml", f"output.dir={runs}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: Unsloth cannot start on this machine: Unsloth cannot find any torch accelerator?" in stderr
    assert "CUDA_VISIBLE_DEVICES=''" in stderr
    assert list(runs.iterdir()) == []  # output.dir was checked by making the run folder, then removed
