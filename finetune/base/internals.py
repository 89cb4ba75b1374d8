"""Every use of a library's private or undocumented API, in one place.

None of these is promised to last. tests/test_internals.py has one test per entry, named after it,
so a release that removes one fails under that name (`make canary` runs against the newest ones):

- huggingface_hub's cache layout, models--ORG--NAME/refs/main -> snapshots/COMMIT/FILE: read
  directly because the library's own lookup imports a quarter of a second of modules, which `plan`
  cannot afford; the snapshot's COMMIT is also the base model's revision in a run's manifest.
- datasets' ``Dataset._fingerprint``: a hub dataset's content identity, part of the prepared-data
  store's key.
- transformers' ``Trainer._save_checkpoint(model, trial)``: a checkpoint written now, after a step
  ran out of memory (the trainer saves only on its own schedule).
- transformers' ``ProgressCallback.training_bar``: the progress bar our per-step lines are
  written through, so they do not tear it.
- transformers' ``PreTrainedModel._weight_conversions``: what `from_pretrained` did to the
  checkpoint's tensors, undone by `save_pretrained`. After `dequantize()` it still lists the
  bitsandbytes 4-bit deserialization, which has no reverse (NotImplementedError at save), so the
  dequantized model's export drops that entry.
- transformers' ``Trainer._load_optimizer_and_scheduler`` maps the optimizer state to
  ``args.device`` when several processes train; on the CPU (gloo) that is a ``cpu:N`` device,
  which torch.load cannot restore to (RuntimeError), so resuming there gets ``cpu`` instead.
- bitsandbytes' ``Linear4bit.support_avx512bf16_for_cpu``: on a CPU with AVX512-BF16, a 4-bit
  layer's first inference forward repacks its weight for a faster kernel, dequantizing the nested
  absmax; the way back re-quantizes it, not exactly. Training after the samples generated before it
  then saw slightly different weights than a resumed run (which generates none first), so resume
  was no longer exact. Training processes turn the repacking off.

Used where they are, because moving them here would hide what they do (each still held by a test
that fails under its name when a release changes it):

- transformers' ``render_jinja_template`` (transformers.utils.chat_template_utils, not exported):
  export/gguf_export.py renders the chat template exactly as training did, to check the Modelfile's
  Go template against it (tests/e2e/test_gguf.py).
- transformers' ``TikTokenConverter`` (convert_slow_tokenizer): models/tiny_model.py builds the
  Llama 3 tokenizer from the tiktoken file llama-models ships (every e2e test loads it).
- torch's ``distributed_c10d._get_default_store()``: base/distributed.py's job store, keys every
  rank reads and writes with no collective (tests/e2e/test_torchrun.py).
- Unsloth's environment variables ``UNSLOTH_DISABLE_STATISTICS`` and ``UNSLOTH_COMPILE_LOCATION``,
  set by train/stack.py before Unsloth is imported (it reads them only then).
- Unsloth's and TRL's loss code, mirrored as constants in plan/loss_memory.py: unsloth_zoo's fused
  cross-entropy ``_BWD_ROWS``, ``_BWD_TILE_BYTES`` and ``fused_linear_rows``, its CPU chunking
  ``UNSLOTH_CPU_CE_CHUNK_ELEMENTS``, TRL's fused LM head (tests/e2e/test_against_the_libraries.py).
- Unsloth's generated GPU trainer dropping TRL's bf16 cast of the adapters on a 4-bit base
  (unsloth/models/rl.py rewrites ``if _is_quantized_model:``), which plan/engine.adapter_bytes
  plans for (tests/e2e/test_gpu.py; on the CPU, test_train.py holds the cast that does happen).
- Unsloth's loader choosing a process's GPU (``loader_utils._infer_local_rank``), which
  base/distributed.device_index follows (tests/e2e/test_torchrun.py).

Nothing here imports torch; the trainer and callback functions take the objects they reach into.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def hub_snapshot(repo_id: str) -> tuple[str, Path] | None:
    """(commit, folder) of a hub model's snapshot in the local Hugging Face cache, or None."""
    from huggingface_hub import constants

    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        return None
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    folder = repo_dir / "snapshots" / commit
    return (commit, folder) if folder.is_dir() else None


def hub_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub model already in the local Hugging Face cache, or None."""
    snapshot = hub_snapshot(repo_id)
    found = snapshot[1] / filename if snapshot else None
    return found if found is not None and found.is_file() else None


def dataset_fingerprint(dataset) -> str:
    """datasets' own digest of a Dataset's content and the transforms that made it."""
    return dataset._fingerprint


def save_checkpoint_now(trainer) -> None:
    """The checkpoint the trainer would write at its next save step, written now."""
    trainer._save_checkpoint(trainer.model, trial=None)


def progress_bar(callback):
    """The tqdm bar of a transformers ProgressCallback while training (None before and after)."""
    return callback.training_bar


def forget_quantized_loading(model) -> None:
    """A dequantized model saved as the plain weights it now has: drop the record of bitsandbytes'
    load-time deserialization, which save_pretrained would otherwise try (and fail) to reverse."""
    conversions = getattr(model, "_weight_conversions", None) or []
    model._weight_conversions = [
        conversion
        for conversion in conversions
        if not any(type(op).__module__.endswith("integrations.bitsandbytes") for op in conversion.operations)
    ]


@contextlib.contextmanager
def cpu_map_location():
    """While a resume on the CPU under torchrun loads its checkpoint: torch.load maps any CPU
    device to plain 'cpu' (the same memory), the one CPU location it can restore to."""
    import torch

    load = torch.load

    def load_on_cpu(*args, map_location=None, **kwargs):
        if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
            if torch.device(map_location).type == "cpu":
                map_location = "cpu"
        return load(*args, map_location=map_location, **kwargs)

    torch.load = load_on_cpu
    try:
        yield
    finally:
        torch.load = load


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking this model's 4-bit weights at inference on the CPU (see above)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
