"""Writing files so that a reader sees the old content or the new, never a part (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: Path, document) -> Path:
    return write_atomic(path, json.dumps(document, indent=2) + "\n")


def cache_root() -> Path:
    """Our cache (the tiny model, tokenizers, prepared data, digests): FINETUNE_CACHE, or
    ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))
