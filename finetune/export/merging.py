"""What `export` merges the adapter into, and whether it can: decided before anything heavy.

The merged model is the adapter added to 16-bit base weights. Which base, in order:
- the recipe's model itself when it is a 16-bit checkpoint (the tiny model, a local 16-bit folder);
- for a 4-bit checkpoint (`...-bnb-4bit`), its 16-bit original when that is on disk;
- online, that original downloaded, after saying what and how large, and checking the disk first;
- offline, the 4-bit checkpoint dequantized: the very weights the adapter was trained against (a
  merge into the original differs from those by the quantization error), said so.
Unsloth's save_pretrained_merged is not used: it downloads the original without saying so, and
offline it raises (unsloth_zoo/saving_utils.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.base.errors import UserError
from finetune.base.files import filesystem, free_bytes
from finetune.base.internals import hub_snapshot
from finetune.models.base import (
    base_model,
    hub_reachable,
    is_quantized,
    offline,
    planning_config,
    sixteen_bit_name,
)
from finetune.models.shapes import count_parameters
from finetune.plan import disk
from finetune.plan.constants import GIB
from finetune.plan.disk import tokenizer_bytes
from finetune.recipe.schema import Recipe


@dataclass(frozen=True)
class MergeBase:
    name: str  # the model it is, as the hub names it (or the folder)
    path: Path | None  # its folder on disk; None until downloaded
    dequantize: bool  # a 4-bit checkpoint, dequantized to 16 bits before the merge
    why: str  # one sentence, printed and written into the merged folder's README.md
    download_bytes: int = 0  # to fetch first (online, the 16-bit original not on disk)


def remote_size(repo_id: str) -> int:
    """Bytes of a hub repository's weights and small files (what a download of it fetches)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True)
    return sum(
        f.size or 0 for f in info.siblings if f.rfilename.endswith((".safetensors", ".json", ".model"))
    )


def merge_base(recipe: Recipe) -> MergeBase:
    """The 16-bit weights the adapter will be merged into (see the module's docstring)."""
    trained_on = base_model(recipe)
    folder = Path(trained_on["path"]) if trained_on["path"] else None
    if folder is None:
        raise UserError(
            f"export: the run's base model {recipe.model.name} is not on disk any more; "
            f"download it again (`hf download {recipe.model.name}`), then export"
        )
    if not is_quantized(folder):
        return MergeBase(recipe.model.name, folder, False, f"merged into {recipe.model.name} (16-bit)")
    # A hub name's 16-bit original; a local 4-bit folder has no name to look it up by.
    local = Path(recipe.model.name).expanduser().is_dir()
    original = None if local else sixteen_bit_name(recipe.model.name)
    if original is not None:
        snapshot = hub_snapshot(original)
        if snapshot is not None:
            return MergeBase(original, snapshot[1], False, f"merged into {original} (16-bit, on disk)")
        if not offline() and hub_reachable():
            size = remote_size(original)
            return MergeBase(
                original,
                None,
                False,
                f"merged into {original} (16-bit, downloaded: {size / GIB:.1f} GiB)",
                size,
            )
    fetch = (
        f"; `hf download {original}` and export again to merge into the 16-bit original" if original else ""
    )
    return MergeBase(
        recipe.model.name,
        folder,
        True,
        f"merged into {recipe.model.name} dequantized to 16 bits, the weights the adapter was trained "
        f"against (the 16-bit original is not on disk and the hub is not reachable{fetch})",
    )


def merged_bytes(recipe: Recipe) -> float:
    """Bytes of the merged model on disk (finetune/plan/disk.py's prediction, which `plan` prints too)."""
    config = planning_config(recipe)
    folder = base_model(recipe)["path"]
    tokenizer = tokenizer_bytes(Path(folder) if folder else None)
    return disk.merged_bytes(count_parameters(config) if config else 0, tokenizer)


def check_room(recipe: Recipe, base: MergeBase, out_dir: Path, need: float | None = None) -> None:
    """Refuse an export the disk (or the memory it merges in) cannot hold, before loading anything.
    ``need``: bytes in ``out_dir`` at the export's peak (default: the merged model alone)."""
    merged = merged_bytes(recipe)
    what = (
        "the merged model" if need is None else "the GGUF export at its peak (the merged model and the GGUF)"
    )
    places = [(out_dir, merged if need is None else need, what)]
    if base.download_bytes:
        from huggingface_hub import constants

        places.append((Path(constants.HF_HUB_CACHE), base.download_bytes, f"the download of {base.name}"))
    for folder, _, what in places:
        free = free_bytes(folder)
        # The download and the export may share one filesystem: then both must fit in it.
        needed = sum(size for other, size, _ in places if filesystem(other) == filesystem(folder))
        if needed > free:
            raise UserError(
                f"export: not enough disk for {what} in {folder}: {needed / GIB:.2f} GiB needed there, "
                f"{free / GIB:.2f} GiB free; free some space or choose --out elsewhere"
            )
    # The merge is done on the CPU in 16 bits (so a GPU of any size can export): RAM for the model.
    import psutil

    available = psutil.virtual_memory().available
    if merged > available:
        raise UserError(
            f"export: merging needs about {merged / GIB:.1f} GiB of RAM (the model in 16 bits), "
            f"{available / GIB:.1f} GiB is available"
        )


def readme(run_dir: Path, base: MergeBase) -> str:
    return (
        f"# Merged model\n\nThe adapter of the run {run_dir.resolve()} {base.why}.\n\n"
        "16-bit safetensors with the run's tokenizer and chat template: plain transformers, vLLM or "
        "llama.cpp's converter load it without this tool or Unsloth.\n"
    )
