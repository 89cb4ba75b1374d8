"""What only a CUDA GPU can show (`pytest -m gpu`; skipped without one, by tests/e2e/conftest.py).

Every other end-to-end test also runs on the GPU when there is one (training, save, reload and
generate, export, resume equality, the probe freeing its memory), taking its expectations from the
device. These add what the CPU backend cannot reach: Unsloth's CUDA path with the probe on by
default, bitsandbytes' 8-bit AdamW and fp32 adapters, a real out-of-memory error caught as exit 3,
and packing through the GPU trainer. None has run yet: no GPU has been lent to this project.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def runner(*args, memory_gib: float | None = None):
    """runner.py in a fresh process; with ``memory_gib``, PyTorch's allocator capped at that much
    of the GPU (set_per_process_memory_fraction), so a micro-batch too large for it is real."""
    cap = ""
    if memory_gib is not None:
        cap = (
            "import torch; total = torch.cuda.get_device_properties(0).total_memory;"
            f"torch.cuda.set_per_process_memory_fraction({memory_gib} * 2**30 / total);"
        )
    code = cap + "import sys; from finetune.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )


def test_the_smoke_recipe_trains_through_unsloths_cuda_path_with_the_probe(tmp_path):
    from safetensors import safe_open

    out = runner("recipes/smoke.yaml", "train.max_steps=6", f"output.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "smoke").iterdir()
    record = json.loads((run_dir / "budget.json").read_text())
    assert record["device"] != "CPU"
    # The probe runs by default on a GPU, measured and held to the card's memory.
    assert "probe: 3 steps on the worst-case micro-batch" in out.stdout
    assert f"PASS measured memory on {record['device']}: " in out.stdout
    assert record["measured_peak_bytes"] > 0 and "GiB measured" in (run_dir / "report.md").read_text()
    # PEFT's adapters are fp32 on a 4-bit base on a GPU (budget.adapter_bytes).
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        dtypes = {str(adapter.get_slice(name).get_dtype()) for name in adapter.keys()}
    assert dtypes == {"F32"}
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["data"]["padding_free"] is False  # decided here, not by Unsloth's auto-switch


def test_a_micro_batch_too_large_for_the_gpu_is_exit_3_with_what_to_change(tmp_path):
    """The allocator capped at 0.25 GiB: the model loads (about 0.1 GiB), the probe's worst-case
    micro-batch (8 rows, about 2,600 tokens; the loss's fp32 chunk alone is over 1 GiB) cannot."""
    out = runner(
        "recipes/smoke.yaml",
        "train.max_steps=6",
        "train.per_device_train_batch_size=8",
        "train.gradient_accumulation_steps=1",
        f"output.dir={tmp_path}",
        memory_gib=0.25,
    )
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: out of memory in the probe, on the worst-case micro-batch" in out.stderr
    assert "peak memory measured: " in out.stderr and "predicted: " in out.stderr


def test_packed_sequences_train_on_the_gpu(tmp_path):
    out = runner("recipes/smoke.yaml", "train.max_steps=4", "data.packing=true", f"output.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packed into" in out.stdout and "step     4/4  loss" in out.stdout + out.stderr
