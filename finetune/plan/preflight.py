"""Checks that run before anything heavy: is there a GPU, and can the model be reached?

A run that cannot start should be refused in seconds with one sentence, not after importing torch,
initialising CUDA and waiting on a download. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
import shutil
import sysconfig
from pathlib import Path

from finetune.base.errors import UserError
from finetune.models.base import hub_reachable, offline, planning_config, resolve_model_config
from finetune.models.shapes import count_parameters
from finetune.models.tiny_model import TINY_MODEL_NAME
from finetune.plan import device_speed
from finetune.plan.devices import MIN_DRIVER, Gpu, detect_gpus
from finetune.recipe.documents import shipped_recipes
from finetune.recipe.schema import Recipe, load_recipe

# Above this size, training on a CPU would take days: refuse and point at the smoke recipe.
CPU_MAX_PARAMETERS = 500_000_000


def fits_a_cpu(recipe: Recipe) -> bool:
    """Small enough to train on a CPU (the tiny model and the like); unknown shapes are not."""
    config = planning_config(recipe)
    return config is not None and count_parameters(config) <= CPU_MAX_PARAMETERS


def check_model_name(recipe: Recipe, source: str) -> None:
    """Refuse a model.name that can be nothing: no folder, not the tiny model, and not shaped like
    a Hugging Face id (owner/name), with the nearest name it may have meant."""
    name = recipe.model.name
    if "/" in name or Path(name).expanduser().is_dir() or planning_config(recipe) is not None:
        return
    known = [TINY_MODEL_NAME, *sorted({load_recipe(path).model.name for path in shipped_recipes()})]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(
        f"{source}: model.name '{name}' is no model: not a folder, not the tiny model and not a Hugging "
        f"Face id; {hint}A name is {TINY_MODEL_NAME}, a folder with a config.json, or owner/name as on "
        "the hub (e.g. unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit)"
    )


def check_can_start(recipe: Recipe, recipe_path: str) -> list[Gpu]:
    """Refuse, with one sentence, a run that cannot start here; return the GPUs it will use."""
    check_model_name(recipe, recipe_path)
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
    method = recipe.train.method_name()
    if not gpus and recipe.model.backend == "transformers" and method in ("dpo", "kto"):
        # Unsloth serves that head from its own kernel on the CPU too; TRL's alone is Triton's.
        raise UserError(
            f"{recipe_path}: train.method {method} on the transformers backend needs a CUDA GPU: TRL's "
            "log-probability head it computes with is a Triton kernel; on the CPU use model.backend: unsloth"
        )
    if config is None:
        if offline() or not hub_reachable():
            reason = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face hub cannot be reached"
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

    status = device_speed.cuda_status()
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
