"""The planning constants, each with where its value came from: published figures, replaced by the ones
benchmarks/fit_constants.py fitted from measured GPU runs (plan/fitted_constants.json) when it has."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

GIB = 1024**3


# What measurement decides. Each value: (number, where it comes from). They are estimates until a
# GPU run fits them; until then the margins printed with every prediction say so.
CONSTANTS = {
    "cuda_context_bytes": (0.5 * GIB, "vram.asmirnov.xyz: 0.3-2 GiB outside PyTorch's allocator; typical"),
    "allocator_overhead": (0.10, "Unsloth docs: leave ~10% for fragmentation (reserved over allocated)"),
    "gemm_efficiency": (
        0.45,
        "public A100 QLoRA throughputs (torchtune, LLaMA-Factory, Qwen) are 20-50% of peak bf16",
    ),
    "bandwidth_efficiency": (0.6, "real dequantization kernels reach 50-80% of peak bandwidth"),
    "micro_batch_overhead_s": (0.03, "kernel launches and Python per micro-batch, tens of ms"),
    # What a 4096x4096 bf16 matmul and a 256 MiB copy (finetune/plan/device_speed.py) reach of a card's
    # datasheet figures, to put a card missing from the table on the table's scale.
    "benchmark_matmul_fraction": (0.75, "dense bf16 GEMM benchmarks reach 70-85% of datasheet TFLOP/s"),
    "benchmark_copy_fraction": (0.85, "device-to-device copies reach 80-90% of datasheet bandwidth"),
    "decode_step_overhead_s": (
        0.025,
        "transformers' generate in eager mode: about 30-45 tokens/s for a 7-8B model at batch 1 on an "
        "A100, launch-bound; Unsloth's fast decode claims about 2x (an estimate: GRPO's generation)",
    ),
    "transformers_slowdown": (1.54, "LLaMA-Factory wiki: Unsloth 4-bit at 1.54x HF 4-bit's tokens/s"),
    "memory_margin": (0.10, "the stated target: peak memory within 10%"),
    "time_margin": (0.15, "the stated target: step time within 15%"),
}


# What benchmarks/fit_constants.py fitted from measured GPU runs (benchmarks/results/), when it has.
FITTED_FILE = Path(str(files("finetune.plan"))) / "fitted_constants.json"


def load_fitted(path: Path = FITTED_FILE) -> dict:
    """Put the fitted constants in CONSTANTS, each with where it came from; {} when none exist."""
    fitted = json.loads(path.read_text()) if path.is_file() else {}
    for name, entry in fitted.items():
        CONSTANTS[name] = (entry["value"], entry["source"])
    return fitted


FITTED = load_fitted()


def constant(name: str) -> float:
    return CONSTANTS[name][0]
