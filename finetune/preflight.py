"""Checks that run before anything heavy: is there a GPU, and can the model be reached?

A run that cannot start should be refused in seconds with one sentence, not after importing torch,
initialising CUDA and waiting on a download. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from finetune.budget import count_parameters
from finetune.recipe import Recipe, RecipeError
from finetune.tiny_model import TINY_CONFIG, TINY_MODEL_NAME

# Above this size, training on a CPU would take days: refuse and point at the smoke recipe.
CPU_MAX_PARAMETERS = 500_000_000


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float


def detect_gpus() -> list[Gpu]:
    """NVIDIA GPUs visible to this process, from nvidia-smi (no CUDA initialisation)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, memory_mib = line.rpartition(",")
        try:
            gpus.append(Gpu(name.strip(), float(memory_mib) / 1024))
        except ValueError:
            continue
    return gpus


def _hub_cached_config(model_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def _hub_reachable(timeout_seconds: float = 3.0) -> bool:
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
    config_path = local / "config.json" if local.is_dir() else _hub_cached_config(name)
    if config_path is None or not config_path.is_file():
        return None
    return json.loads(config_path.read_text())


def check_can_start(recipe: Recipe, recipe_path: str) -> list[Gpu]:
    """Refuse, with one sentence, a run that cannot start here; return the GPUs it will use."""
    name = recipe.model.name
    gpus = detect_gpus()
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():
        raise RecipeError(f"{recipe_path}: model.name '{name}' looks like a local folder but does not exist")
    config = resolve_model_config(recipe)
    small = config is not None and count_parameters(config) <= CPU_MAX_PARAMETERS
    if not gpus and not small:
        size = f" ({count_parameters(config) / 1e9:.1f}B parameters)" if config else ""
        raise RecipeError(
            f"No GPU found: {recipe_path} trains {name}{size}, which needs a CUDA GPU; "
            "on this machine try `python runner.py recipes/smoke.yaml`, "
            "which trains a tiny Llama 3 on the CPU."
        )
    if config is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
            raise RecipeError(
                f"Model not reachable: {recipe_path} uses {name}, "
                f"which is not in the local Hugging Face cache and {reason}; "
                f"download it where there is a network (`hf download {name}`) "
                "or set model.name to a local folder."
            )
    return gpus
