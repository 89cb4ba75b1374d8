"""Measure a device's matmul throughput and memory bandwidth with torch, in a child process.

`plan` stays free of torch: it runs ``python -m finetune.plan.device_speed cuda`` once per GPU model and
caches the answer for a day (``~/.cache/finetune/device-speed``). The same code measures the CPU
(``cpu``), which is how the tests exercise it on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from finetune.base.files import write_atomic
from finetune.base.processes import child_setup

CACHE_SECONDS = 24 * 3600


def measure(device: str, seconds: float = 0.5) -> dict:
    """Best-of-trials dense matmul TFLOP/s (bf16 on a GPU, fp32 on the CPU) and copy GB/s."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 4096 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    big = torch.empty(256 * 2**20 if device == "cuda" else 16 * 2**20, dtype=torch.uint8, device=device)

    def best(work, amount: float) -> float:
        work()  # warm-up: kernel selection, allocation
        rates, deadline = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline or len(rates) < 3:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            work()
            if device == "cuda":
                torch.cuda.synchronize()
            rates.append(amount / (time.perf_counter() - start))
        return max(rates)

    flops = best(lambda: a @ b, 2 * n**3)
    bandwidth = best(lambda: big.clone(), 2 * big.numel())
    return {"tflops": flops / 1e12, "bandwidth_gbs": bandwidth / 1e9, "measured_at": time.time()}


def cached_measurement(device: str, name: str, cache_dir: Path) -> dict | None:
    """The measurement of this device model, from the cache or a child process; None if it fails."""
    cache = cache_dir / f"{device}-{''.join(c if c.isalnum() else '-' for c in name)}.json"
    if cache.is_file():
        found = json.loads(cache.read_text())
        if time.time() - found["measured_at"] < CACHE_SECONDS:
            return found
    found = _ask_child(device)
    if found is None or "error" in found:
        return None
    write_atomic(cache, json.dumps(found))
    return found


def cuda_status() -> dict:
    """Whether torch can use this machine's GPU, asked of a child process (this one stays free of
    torch): the torch version, the CUDA version it was built for, and ``error`` when it cannot."""
    return _ask_child("check") or {"error": "the check's child process printed nothing"}


def _check_cuda() -> dict:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        status = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
        try:
            if not torch.cuda.is_available():
                # torch says why only in a warning (e.g. "The NVIDIA driver on your system is too old").
                reasons = [
                    str(w.message) for w in caught if "CUDA" in str(w.message) or "driver" in str(w.message)
                ]
                raise RuntimeError(reasons[-1] if reasons else "torch.cuda.is_available() is False")
            torch.zeros(1, device="cuda")
        except Exception as exc:  # whatever stops torch from using the GPU is the finding
            status["error"] = " ".join(f"{exc}".split())[:400]
    return status


def _ask_child(command: str) -> dict | None:
    """Run this module as a child process (``cuda``/``cpu``: measure; ``check``: cuda_status), from any
    working directory: the child finds this package where this process found it."""
    package_parent = str(Path(str(files("finetune"))).parent)
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "finetune.plan.device_speed", command],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": path},
            preexec_fn=child_setup(),
        )
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):  # hung, or printed no answer
        return None


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps(_check_cuda() if command == "check" else measure(command)))
