"""`export`, top to bottom, for both formats: every refusal first, then one merge of the adapter
into 16-bit weights (merging.py decides which), saved as safetensors or converted from there into
GGUF (gguf_export.py)."""

from __future__ import annotations

from pathlib import Path

from finetune.export import gguf_export, merging
from finetune.plan.constants import GIB
from finetune.runs.run_folder import check_export_folder, export_folder, finished_adapter


def export_run(run_dir: Path, out_dir: Path, quant: str | None, say) -> Path:
    """`export`: the run's adapter merged into 16-bit weights, saved as safetensors (``quant`` None)
    or converted from them into GGUF (``quant``: f16, q8_0 or q4_k_m). Every refusal comes first (the
    adapter, the tools, the disk, the memory, the folder), so a refused export makes nothing; the
    export is staged and appears whole or not at all. ``say`` prints lines as they come."""
    recipe, _ = finished_adapter(run_dir)
    if quant:
        gguf_export.check_tools(quant)
    base = merging.merge_base(recipe)
    peak = gguf_export.peak_bytes(recipe, quant, merging.merged_bytes(recipe)) if quant else None
    merging.check_room(recipe, base, out_dir, peak)
    check_export_folder(out_dir)
    say(f"export: {base.why}")
    from finetune.train.backend import inference_stack  # the heavy stack, on the run's backend

    inference = inference_stack(recipe)
    if quant is None:
        with export_folder(out_dir, run_dir, "the merged model") as staging:
            inference.export(run_dir, staging, base)
        say(f"merged 16-bit model saved to {out_dir}")
        return out_dir
    # The log goes in the run folder, so that a failed export can remove all it made and still be read.
    log = run_dir / "llama.cpp.log"
    say(f"then llama.cpp's converter ({quant}); its log: {log}")
    name = run_dir.parent.name or "model"  # runs/<recipe>/<run>: the recipe's name
    with export_folder(out_dir, run_dir, "the GGUF export") as staging:
        merged = inference.export(run_dir, staging / ".merged-16bit", base)
        written, lines = gguf_export.write_gguf(merged, staging, quant, name, log)
    path = out_dir / written.name
    say(
        *lines,
        f"GGUF saved to {path} ({path.stat().st_size / GIB:.2f} GiB); Modelfile beside it: "
        f"`ollama create {name} -f {out_dir / 'Modelfile'}`",
    )
    return path
