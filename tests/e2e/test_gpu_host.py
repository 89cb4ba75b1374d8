"""A GPU host torch cannot use is refused in one sentence, before any run folder exists.

A stand-in nvidia-smi lists a GPU (with an old driver) that torch cannot use, which is what a first
run on a host with an outdated driver meets. Both tests also hold on a machine with a working GPU:
each hides that GPU from torch (CUDA_VISIBLE_DEVICES), so neither trains on it."""

import os
from pathlib import Path

import torch
from cli_helpers import runner

ROOT = Path(__file__).resolve().parents[2]
# The stand-in GPU's UUID. As CUDA_VISIBLE_DEVICES it is the GPU our preflight picks from the
# stand-in's list (preflight.detect_gpus selects by UUID as CUDA does), and a GPU CUDA cannot find
# (no real card has this UUID), so torch sees none: with no GPU (here) and with a working one alike.
STAND_IN_UUID = "GPU-5f2b8c1e"
# The oldest driver each CUDA major version runs on (NVIDIA's CUDA compatibility table, Linux).
OLDEST_DRIVER = {"12": "525.60.13", "13": "580.65.06"}
# Unsloth's own switches that would choose a device for it (unsloth_zoo/device_type.py).
UNSLOTH_DEVICE_SWITCHES = ("UNSLOTH_ALLOW_CPU", "UNSLOTH_FORCE_CPU", "UNSLOTH_ZOO_DISABLE_GPU_INIT")


def test_a_gpu_that_torch_cannot_use_is_one_sentence_and_no_run_folder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\necho "0, {STAND_IN_UUID}, NVIDIA GeForce RTX 4090, 24564, 24000, 535.104.05"\n'
    )
    smi.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": STAND_IN_UUID,
    }
    runs = tmp_path / "runs"
    out = runner("recipes/smoke.yaml", f"output.dir={runs}", env=env, timeout=600)
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # The torch this interpreter has (our pin here, the image's own on the GPU machine), in its words.
    torch_build = f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use it"
    assert f"nvidia-smi lists NVIDIA GeForce RTX 4090 (driver 535.104.05), but {torch_build}" in stderr
    needs = OLDEST_DRIVER[str(torch.version.cuda).split(".")[0]]
    assert f"a CUDA {torch.version.cuda} build needs driver {needs} or newer" in stderr
    assert not runs.exists()


def test_a_machine_unsloth_refuses_is_one_sentence_and_no_run_folder(tmp_path):
    """Unsloth decides its device when imported and raises NotImplementedError where a GPU driver is
    loaded but torch cannot use it. UNSLOTH_DISABLE_CPU_FALLBACK=1 takes the same branch where torch
    sees no GPU: here, and on a GPU machine with its GPU hidden (CUDA_VISIBLE_DEVICES='', which our
    preflight also reads as no GPU, so the run gets as far as Unsloth's import on either)."""
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "UNSLOTH_DISABLE_CPU_FALLBACK": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    for switch in UNSLOTH_DEVICE_SWITCHES:
        env.pop(switch, None)
    out = runner("recipes/smoke.yaml", f"output.dir={runs}", env=env, timeout=600)
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: Unsloth cannot start on this machine: Unsloth cannot find any torch accelerator?" in stderr
    assert "CUDA_VISIBLE_DEVICES=''" in stderr
    assert list(runs.iterdir()) == []  # output.dir was checked by making the run folder, then removed
