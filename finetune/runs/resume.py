"""Where a resume continues from: the run's latest sound checkpoint, once its inputs and its number
of processes are the ones it started with (no torch)."""

from __future__ import annotations

from pathlib import Path

from finetune.base import distributed
from finetune.base.errors import UserError
from finetune.data.store import run_fingerprints
from finetune.recipe.schema import Recipe
from finetune.runs.run_folder import (
    clear_for_restart,
    fingerprint_changes,
    latest_checkpoint,
    read_json,
    read_run,
)


def check_not_finished(run_dir: Path) -> None:
    """Refuse (exit 2), before anything is read or written, to resume a run whose last step is done,
    its adapter saved and its report written (last): training on would pass its end and replace
    what it made. A longer run is a new one. One stopped between the adapter and the report resumes
    from its last checkpoint, at its last step: no step is trained again, and the report is written."""
    if (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "report.md").is_file():
        raise UserError(
            f"{run_dir} has finished (its adapter is in {run_dir / 'adapter'}): nothing to resume; to "
            "train longer, train the recipe again with more steps"
        )


def resume_point(recipe: Recipe, run_dir: Path, force: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume continues from, and the lines to print about it. The run's inputs are
    compared with its manifest first, so changed inputs are refused (unless ``force``) before
    anything is prepared from them or anything heavy is imported. A run that died before its first
    sound checkpoint (in data preparation, model loading, its first steps) is trained again from
    the first step in the same folder: None. (A finished run was refused before: check_not_finished.)"""
    lines = []
    if (run_dir / "manifest.json").is_file():  # not yet written when it died loading the model
        manifest = read_run(run_dir, needs=("fingerprints",))
        changes = fingerprint_changes(manifest["fingerprints"], run_fingerprints(recipe))
        if changes and not force:
            raise UserError(
                f"{run_dir}: the inputs changed since the run started, so resuming would not continue the "
                f"same run ({'; '.join(changes)}); --force resumes anyway"
            )
        lines = [f"warning: --force: resuming although {line}" for line in changes]
    lines += _same_world_size(run_dir, force)
    checkpoint, skipped = latest_checkpoint(run_dir)
    lines += skipped
    if checkpoint is None and (run_dir / "adapter" / "adapter_config.json").is_file():
        # Its adapter saved without a checkpoint to resume (save_steps past its last step), its
        # report maybe not: training it again would replace the adapter it made.
        raise UserError(
            f"{run_dir} has finished (its adapter is in {run_dir / 'adapter'}): nothing to resume"
        )
    if checkpoint is None:
        done = clear_for_restart(run_dir)
        said = f" ({'; '.join(done)})" if done else ""
        return None, [*lines, f"no sound checkpoint yet: training again from the first step{said}"]
    return checkpoint, [*lines, f"resuming from {checkpoint.name}"]


def _same_world_size(run_dir: Path, force: bool) -> list[str]:
    """A run resumes on as many processes as it started with: with another number every global
    batch, and so the order the rows are seen in, changes from the checkpoint on."""
    run_file = run_dir / "run.json"
    then = "it records how the run was started: train the recipe again"
    started = read_json(run_file, then).get("world_size", 1) if run_file.is_file() else 1
    if not isinstance(started, int) or isinstance(started, bool) or started < 1:
        raise UserError(f"{run_file}: damaged (world_size {started!r}); {then}")
    now = distributed.world_size()
    if started == now:
        return []
    why = (
        f"{run_dir} was started on {started} process{'es' if started > 1 else ''} and this is "
        f"{now}: the global batch and the order of the rows would change from the checkpoint on"
    )
    if not force:
        resume = (
            f"torchrun --nproc_per_node {started} runner.py resume"
            if started > 1
            else "python runner.py resume"
        )
        raise UserError(f"{why}; resume with `{resume} {run_dir}`, or --force to continue anyway")
    return [f"warning: --force: resuming although {why}"]
