"""The devices a run is planned for: the GPU table (for `plan --gpu NAME`), the GPUs nvidia-smi lists
here, the CPU, and the one a run will train on, with its measured or tabled speed (no torch)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from finetune.base.errors import UserError
from finetune.base.files import cache_root
from finetune.plan import device_speed
from finetune.plan.constants import GIB, constant


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    bf16_tflops: float  # dense bf16 tensor throughput (FP32 accumulate on GeForce parts)
    bandwidth_gbs: float
    source: str
    is_gpu: bool = True


# Known GPUs, for planning without the card (`plan --gpu NAME`): dense bf16 tensor throughput and
# memory bandwidth from the vendors' datasheets and whitepapers, each named in its source.
GPUS = {
    "rtx-3090": Device("RTX 3090", 24 * GIB, 71.0, 936.0, "NVIDIA GA102 whitepaper"),
    "rtx-4090": Device("RTX 4090", 24 * GIB, 165.2, 1008.0, "NVIDIA Ada whitepaper"),
    "l4": Device("L4", 24 * GIB, 121.0, 300.0, "NVIDIA L4 datasheet"),
    "a10g": Device("A10G", 24 * GIB, 70.0, 600.0, "AWS G5 / NVIDIA A10 datasheet"),
    "a100-40gb": Device("A100 40GB", 40 * GIB, 312.0, 1555.0, "NVIDIA A100 datasheet"),
    "a100-80gb": Device("A100 80GB", 80 * GIB, 312.0, 2039.0, "NVIDIA A100 datasheet"),
    "h100-pcie": Device("H100 PCIe", 80 * GIB, 756.0, 2000.0, "NVIDIA H100 datasheet"),
    "h100": Device("H100 SXM", 80 * GIB, 989.4, 3350.0, "NVIDIA H100 datasheet"),
    "h200": Device("H200", 141 * GIB, 989.4, 4800.0, "NVIDIA H200 datasheet"),
}


# Table keys by what a GPU's name contains (lowercase, letters and digits only), most specific first:
# nvidia-smi says e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090".
_NAME_PATTERNS = (
    ("h200", "h200"),
    ("h100pcie", "h100-pcie"),
    ("h100", "h100"),
    ("a10040gb", "a100-40gb"),
    ("a100pcie40gb", "a100-40gb"),
    ("a100sxm440gb", "a100-40gb"),
    ("a100", "a100-80gb"),
    ("a10g", "a10g"),
    ("4090", "rtx-4090"),
    ("3090", "rtx-3090"),
)


def gpu_by_name(name: str) -> Device | None:
    """A table entry from a user's or nvidia-smi's spelling ('rtx-4090', 'NVIDIA A100-SXM4-80GB', ...)."""
    if name in GPUS:
        return GPUS[name]
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for pattern, table_key in _NAME_PATTERNS:
        if pattern in key:
            return GPUS[table_key]
    if re.fullmatch(r"(nvidia)?l4", key):  # not the L40
        return GPUS["l4"]
    return None


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    free_gib: float
    driver: str = ""  # the NVIDIA driver's version, as nvidia-smi reports it


# The oldest NVIDIA driver each CUDA major version runs on (Linux; NVIDIA's CUDA compatibility table).
MIN_DRIVER = {"12": "525.60.13", "13": "580.65.06"}


def detect_gpus() -> list[Gpu]:
    """The NVIDIA GPUs this process's torch will use, in its order, from nvidia-smi (no CUDA
    initialisation). nvidia-smi lists every GPU of the machine whatever CUDA_VISIBLE_DEVICES says,
    so its rows are chosen and ordered here as CUDA does: by index or by UUID (or its prefix)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "--query-gpu=index,uuid,name,memory.total,memory.free,driver_version"
    try:
        out = subprocess.run(
            [smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = {}
    for line in out.strip().splitlines():
        index, uuid, rest = (line.split(",", 2) + ["", ""])[:3]
        name, total_mib, free_mib, driver = (rest.rsplit(",", 3) + ["", "", ""])[:4]
        try:
            gpu = Gpu(name.strip(), float(total_mib) / 1024, float(free_mib) / 1024, driver.strip())
        except ValueError:
            continue
        rows[(index.strip(), uuid.strip())] = gpu
    if visible is None:
        return list(rows.values())
    chosen = []
    for wanted in (entry.strip() for entry in visible.split(",")):
        match = [
            gpu
            for (index, uuid), gpu in rows.items()
            if wanted in (index, uuid) or (wanted.startswith("GPU-") and uuid.startswith(wanted))
        ]
        if not match:
            break  # CUDA stops at the first entry it cannot resolve
        chosen.append(match[0])
    return chosen


def cpu_device(seconds: float = 0.1) -> Device:
    """This machine's CPU as a training device: a float32 matmul and a copy, timed (numpy, no torch).
    The best of several short trials, so a busy moment does not pass for the machine's speed."""

    import numpy as np

    def best_rate(work, amount: float) -> float:
        rates = []
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline or len(rates) < 3:
            start = time.perf_counter()
            work()
            rates.append(amount / (time.perf_counter() - start))
        return max(rates)

    a = np.ones((512, 512), dtype=np.float32)
    big = np.ones(16 * 2**20 // 4, dtype=np.float32)
    flops = best_rate(lambda: a @ a, 2 * 512**3)
    bandwidth = best_rate(big.copy, 2 * big.nbytes)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(
        "CPU", memory, flops / 1e12, bandwidth / 1e9, "measured now: numpy matmul and copy", is_gpu=False
    )


def training_device(gpu_name: str | None = None) -> Device:
    """The device a plan is for: a named GPU from the table, else the first GPU this process's torch
    will use (its free memory is the limit), else this machine's CPU, measured."""
    if gpu_name:
        device = gpu_by_name(gpu_name)
        if device is None:
            raise UserError(f"unknown GPU '{gpu_name}'; known: {', '.join(GPUS)}")
        return device
    gpus = detect_gpus()
    if not gpus:
        return cpu_device()
    gpu = gpus[0]
    free = gpu.free_gib * GIB
    known = gpu_by_name(gpu.name)
    if known is not None:
        # The table's figures, the ones the constants are fitted against, so `plan` here and
        # `plan --gpu` for this card elsewhere predict the same; the limit is what is free now.
        return dataclasses.replace(known, name=gpu.name, memory_bytes=free)
    # A card the table lacks: its speed measured once a day in a child process (torch stays out of
    # `plan`), scaled to datasheet-equivalent figures, which is what the time model's constants take.
    measured = device_speed.cached_measurement("cuda", gpu.name, cache_root() / "device-speed")
    if measured is not None:
        return Device(
            gpu.name,
            free,
            measured["tflops"] / constant("benchmark_matmul_fraction"),
            measured["bandwidth_gbs"] / constant("benchmark_copy_fraction"),
            f"not in the speed table; measured on this GPU: {measured['tflops']:.0f} TFLOP/s bf16 matmul, "
            f"{measured['bandwidth_gbs']:.0f} GB/s copy",
        )
    # Never refused: its memory is known (nvidia-smi); for its speed, the slowest card of the table,
    # so the time predicted is an upper bound, and the plan says so.
    slowest = min(GPUS.values(), key=lambda d: d.bf16_tflops)
    return Device(
        gpu.name,
        free,
        slowest.bf16_tflops,
        min(d.bandwidth_gbs for d in GPUS.values()),
        f"not measured and not in the speed table: the slowest known GPU's figures ({slowest.name}), "
        "so the time predicted is an upper bound; --gpu NAME plans for a known card",
    )
