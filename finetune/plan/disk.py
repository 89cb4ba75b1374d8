"""Disk a run will use, planned like memory: its checkpoints, the adapter, its own files, the base
model's download, and what `export` will write later, each against the free space where it goes.
Pure functions of the recipe and the model's shape (tokenizer_bytes stats the model's tokenizer
files); the free space is measured by the caller.

What a checkpoint holds (transformers' Trainer._save_checkpoint through PEFT, as written on the CPU
backend and read for the GPU one): adapter_model.safetensors (the LoRA weights in their training
dtype), optimizer.pt (the optimizer's state), the tokenizer files, and small files (rng_state.pth,
scheduler.pt, trainer_state.json, training_args.bin, README.md, our seal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finetune.models.shapes import Shapes
from finetune.plan.budget import (
    Verdict,
    optimizer_state_bytes,
    reference_adapter,
    trainable_bytes,
    trainable_tensors,
)
from finetune.plan.constants import GIB
from finetune.plan.engine import effective_optimizer
from finetune.recipe.schema import Recipe

MIB = 2**20
# The tokenizer files saved with every checkpoint and the adapter, when none is on disk to measure:
# Llama 3's tokenizer.json is 17,209,880 bytes, its config and chat template a few KB.
LLAMA3_TOKENIZER_BYTES = 17_220_000
# rng_state.pth, scheduler.pt, training_args.bin, README.md, the seal and dtype record: 31 KB
# measured on the smoke run; rounded up.
CHECKPOINT_SMALL_FILES_BYTES = 64 * 1024
TENSOR_OVERHEAD_BYTES = 512  # each tensor's entry in the safetensors header or optimizer.pt's pickle
# trainer_state.json in each checkpoint and log.jsonl, TensorBoard's events in the run, per step.
BYTES_PER_STEP = 1024
# plan.json, recipe.yaml, manifest.json, report.md, samples.json, the loss and LR plots.
RUN_FILES_BYTES = 4 * MIB
# The merged model's config, generation config, README and safetensors header.
MERGED_SMALL_FILES_BYTES = 1 * MIB
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class DiskPlan:
    checkpoint_bytes: float  # one checkpoint
    checkpoints_at_once: int  # the ones kept, plus the new one written before the oldest is deleted
    run_terms: dict[str, float]  # in the run folder, at its fullest
    download_bytes: float  # the base model into the Hugging Face cache; 0 when it is there
    export_bytes: float  # `export` into the run folder's merged/, later

    @property
    def run_bytes(self) -> float:
        return sum(self.run_terms.values())


def save_every(recipe: Recipe, total_steps: int) -> int:
    """Steps between checkpoints: train.save_steps, else 10% of training (as transformers rounds it)."""
    return recipe.train.save_steps or max(1, math.ceil(total_steps * 0.1))


def checkpoints_written(recipe: Recipe, total_steps: int) -> int:
    """Checkpoints the trainer writes: one every save_every steps, and one at the end when the last
    step is not a multiple (transformers' DefaultFlowCallback saves at the end of training)."""
    every = save_every(recipe, total_steps)
    return total_steps // every + (1 if total_steps % every else 0)


def tokenizer_bytes(folder: Path | None) -> int | None:
    """The tokenizer files every checkpoint, the adapter and the merged model copy, measured in the
    model's folder (None when it has no tokenizer there)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    return sum((folder / name).stat().st_size for name in TOKENIZER_FILES if (folder / name).is_file())


def merged_bytes(parameters: int, tokenizer: int | None) -> float:
    """The merged model on disk: every parameter in 16 bits, its tokenizer and small files."""
    tokenizer = LLAMA3_TOKENIZER_BYTES if tokenizer is None else tokenizer
    return 2 * parameters + tokenizer + MERGED_SMALL_FILES_BYTES


def predict_disk(
    recipe: Recipe,
    shapes: Shapes,
    total_steps: int,
    on_gpu: bool,
    tokenizer_files: int | None,
    download_bytes: float,
    parameters: int,
) -> DiskPlan:
    """Bytes in the run folder at its fullest, and beside it (see the module's docstring)."""
    groups = trainable_tensors(shapes, recipe.lora, recipe.model, on_gpu)  # in their training dtypes
    tensors = sum(len(sizes) for sizes, _ in groups)
    adapter = trainable_bytes(groups) + tensors * TENSOR_OVERHEAD_BYTES
    optim = effective_optimizer(recipe.train.optim, on_gpu)
    state = sum(optimizer_state_bytes(optim, sizes, size) for sizes, size in groups)
    optimizer = state + 2 * tensors * TENSOR_OVERHEAD_BYTES
    tokenizer = LLAMA3_TOKENIZER_BYTES if tokenizer_files is None else tokenizer_files
    steps_log = total_steps * BYTES_PER_STEP
    # DPO's and KTO's reference adapter is saved in each checkpoint too (its ref/ folder)
    reference = sum(reference_adapter(recipe, shapes).values())
    checkpoint = adapter + reference + optimizer + tokenizer + CHECKPOINT_SMALL_FILES_BYTES + steps_log
    at_once = min(recipe.train.save_total_limit + 1, checkpoints_written(recipe, total_steps))
    terms = {
        f"checkpoints ({at_once} at once, {checkpoint / MIB:.1f} MiB each)": at_once * checkpoint,
        "adapter and tokenizer": adapter + tokenizer,
        "log, TensorBoard, plan, report": RUN_FILES_BYTES + 2 * steps_log,
    }
    return DiskPlan(checkpoint, at_once, terms, download_bytes, merged_bytes(parameters, tokenizer_files))


@dataclass(frozen=True)
class Place:
    """A folder things will be written into: its free space and its filesystem."""

    folder: str
    free: int
    filesystem: int


def disk_verdicts(plan: DiskPlan, run: Place, cache: Place) -> tuple[list[Verdict], list[str]]:
    """(the gate's verdicts: the run's files and the base model's download; lines for what is not a
    gate: export, which `export --out` can send elsewhere)."""
    together = run.filesystem == cache.filesystem
    needed_here = plan.run_bytes + (plan.download_bytes if together else 0)
    what = "the run's files" + (" and the base model's download" if together and plan.download_bytes else "")
    verdicts = [Verdict(f"disk in {run.folder} ({what})", needed_here / GIB, run.free / GIB, "GiB", "free")]
    if plan.download_bytes and not together:
        verdicts.append(
            Verdict(
                f"disk in {cache.folder} (the base model's download)",
                plan.download_bytes / GIB,
                cache.free / GIB,
                "GiB",
                "free",
            )
        )
    room_after = run.free - needed_here
    # Not a verdict (nothing is refused for it), so not PASS or FAIL: a note.
    enough = "enough" if plan.export_bytes <= room_after else "not enough: `export --out` can write elsewhere"
    notes = [
        f"note: a later export into the run folder needs {plan.export_bytes / GIB:.2f} GiB; "
        f"{max(room_after, 0) / GIB:.2f} GiB will be free after training ({enough})"
    ]
    return verdicts, notes


def describe_disk(plan: DiskPlan) -> list[str]:
    lines = [f"disk, the run folder at its fullest: {plan.run_bytes / GIB:.2f} GiB"]
    lines += [f"  {name:<42} {value / GIB:8.3f} GiB" for name, value in plan.run_terms.items()]
    if plan.download_bytes:
        name = "base model download (Hugging Face cache)"
        lines.append(f"  {name:<42} {plan.download_bytes / GIB:8.3f} GiB")
    return lines


def disk_as_dict(plan: DiskPlan, verdicts: list[Verdict]) -> dict:
    return {
        "run_bytes": plan.run_terms,
        "run_total_bytes": plan.run_bytes,
        "checkpoint_bytes": plan.checkpoint_bytes,
        "checkpoints_at_once": plan.checkpoints_at_once,
        "download_bytes": plan.download_bytes,
        "export_bytes": plan.export_bytes,
        "verdicts": [
            {"what": v.what, "predicted": v.predicted, "limit": v.limit, "unit": v.unit, "ok": v.ok}
            for v in verdicts
        ],
    }
