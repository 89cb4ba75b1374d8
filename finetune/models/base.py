"""The base model a recipe names: its config.json without a download, its identity for the manifest,
whether it is stored 4-bit and its 16-bit original, and whether the hub may be asked (no torch)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune.base.internals import hub_cached_file, hub_snapshot
from finetune.models.shapes import shipped_config
from finetune.models.tiny_model import TINY_CONFIG, TINY_MODEL_NAME, tiny_model_dir
from finetune.recipe.schema import Recipe


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


# The suffixes of Unsloth's pre-quantized repositories; removing one names the 16-bit original.
_FOUR_BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


def sixteen_bit_name(name: str) -> str | None:
    """The 16-bit original of a pre-quantized repository ('unsloth/X-bnb-4bit' -> 'unsloth/X')."""
    for suffix in _FOUR_BIT_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


def is_quantized(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
