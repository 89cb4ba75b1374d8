"""Checks that run before anything heavy: is there a GPU, and can the model be reached?

A run that cannot start should be refused in seconds with one sentence, not after importing torch,
initialising CUDA and waiting on a download. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from finetune.budget import GIB, GPUS, Device, constant, gpu_by_name
from finetune.internals import hub_cached_file, hub_snapshot
from finetune.recipe import Recipe, UserError
from finetune.shapes import count_parameters, shipped_config
from finetune.tiny_model import TINY_CONFIG, TINY_MODEL_NAME, tiny_model_dir

# Above this size, training on a CPU would take days: refuse and point at the smoke recipe.
CPU_MAX_PARAMETERS = 500_000_000


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
    import time

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
    from finetune.device_speed import cached_measurement
    from finetune.tiny_model import cache_root

    measured = cached_measurement("cuda", gpu.name, cache_root() / "device-speed")
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


def hub_reachable(timeout_seconds: float = 3.0) -> bool:
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_seconds)
    except Exception:  # any failure to connect means the same thing here: unreachable
        return False
    return True


def resolve_model_config(recipe: Recipe) -> dict | None:
    """The model's config.json if it is available without a download (tiny, local folder, or HF cache)."""
    name = recipe.model.name
    if name == TINY_MODEL_NAME:
        return dict(TINY_CONFIG)
    local = Path(name).expanduser()
    config_path = local / "config.json" if local.is_dir() else hub_cached_file(name, "config.json")
    if config_path is None or not config_path.is_file():
        return None
    return json.loads(config_path.read_text())


def base_model(recipe: Recipe) -> dict[str, str | None]:
    """Which base model the recipe's name resolves to here, for a run's manifest and a resume's check:
    its name, its folder, and its revision: the hub snapshot's commit; for a local folder a digest of
    config.json and the weight files' names and sizes; for the tiny model its definition's digest."""
    name = recipe.model.name
    if name == TINY_MODEL_NAME:
        folder = tiny_model_dir()
        return {"name": name, "path": str(folder), "revision": folder.name.rsplit("-", 1)[-1]}
    local = Path(name).expanduser()
    if local.is_dir():
        digest = hashlib.sha256()
        config = local / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for weights in sorted(local.glob("*.safetensors*")) + sorted(local.glob("*.bin")):
            digest.update(f"{weights.name} {weights.stat().st_size}\n".encode())
        return {"name": name, "path": str(local.resolve()), "revision": "sha256:" + digest.hexdigest()[:16]}
    snapshot = hub_snapshot(name)
    if snapshot is None:
        return {"name": name, "path": None, "revision": None}  # not downloaded yet
    return {"name": name, "path": str(snapshot[1]), "revision": snapshot[0]}


def planning_config(recipe: Recipe) -> dict | None:
    """The model's shape for planning: its config.json on disk, or the shipped copy of a known model's."""
    return resolve_model_config(recipe) or shipped_config(recipe.model.name)


def fits_a_cpu(recipe: Recipe) -> bool:
    """Small enough to train on a CPU (the tiny model and the like); unknown shapes are not."""
    config = planning_config(recipe)
    return config is not None and count_parameters(config) <= CPU_MAX_PARAMETERS


def check_can_start(recipe: Recipe, recipe_path: str) -> list[Gpu]:
    """Refuse, with one sentence, a run that cannot start here; return the GPUs it will use."""
    name = recipe.model.name
    gpus = detect_gpus()
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():
        raise UserError(f"{recipe_path}: model.name '{name}' looks like a local folder but does not exist")
    config = resolve_model_config(recipe)
    small = config is not None and count_parameters(config) <= CPU_MAX_PARAMETERS
    if not gpus and not small:
        size = f" ({count_parameters(config) / 1e9:.1f}B parameters)" if config else ""
        raise UserError(
            f"No GPU found: {recipe_path} trains {name}{size}, which needs a CUDA GPU; "
            "on this machine try `python runner.py recipes/smoke.yaml`, "
            "which trains a tiny Llama 3 on the CPU."
        )
    if config is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline or not hub_reachable():
            reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
            raise UserError(
                f"Model not reachable: {recipe_path} uses {name}, "
                f"which is not in the local Hugging Face cache and {reason}; "
                f"download it where there is a network (`hf download {name}`) "
                "or set model.name to a local folder."
            )
    if gpus:
        check_gpu_usable(gpus[0], recipe_path)
    return gpus


def check_gpu_usable(gpu: Gpu, recipe_path: str) -> None:
    """Refuse, before any run folder exists, a GPU that nvidia-smi lists but torch cannot use (a
    driver older than the torch build needs), or a machine without what Triton needs to compile
    Unsloth's kernels at the first step (a C compiler and Python's headers)."""
    import sysconfig

    from finetune.device_speed import cuda_status

    status = cuda_status()
    if "error" in status:
        build = status.get("cuda_build")
        needs = MIN_DRIVER.get(str(build).split(".")[0]) if build else None
        wants = f"; a CUDA {build} build needs driver {needs} or newer" if needs else ""
        driver = gpu.driver or "version unknown"
        torch_build = f"torch {status.get('torch', '?')} (built for CUDA {build or 'none'})"
        raise UserError(
            f"{recipe_path}: nvidia-smi lists {gpu.name} (driver {driver}), but {torch_build} cannot "
            f"use it: {status['error']}{wants}. Update the NVIDIA driver, or install the torch build "
            "for the CUDA version this driver supports."
        )
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [] if compiler else ["a C compiler (install gcc)"]
    missing += [] if headers.is_file() else [f"Python's headers ({headers} is missing: install python3-dev)"]
    if missing:
        raise UserError(
            f"{recipe_path}: Triton compiles Unsloth's GPU kernels at the first training step and needs "
            f"{' and '.join(missing)}."
        )
