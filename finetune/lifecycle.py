"""A run's life, top to bottom: plan, folder, start or resume, train, finish, evaluate.

`train_run` and `resume_run` are the one sequence every caller uses (the command line, the nightly
smoke, the benchmarks): each stage is a call into the subpackage that owns it, in the order a run
happens, and nothing heavy is imported before the run folder exists. What a run says as it goes
goes through ``say`` (lines) and ``warn`` (warnings); how it ended comes back as an Ended, which
the command line turns into an exit code and the smoke into figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.base import distributed
from finetune.base.console import progress_bar
from finetune.base.errors import UserError
from finetune.base.files import CHECKOUT
from finetune.base.processes import child_setup
from finetune.evaluate.evaluation import check_evaluation_settings, check_reward_settings, evaluate_run
from finetune.plan.calibration import probe_verdict
from finetune.plan.devices import Gpu, detect_gpus
from finetune.plan.job import Job, plan_document, plan_job
from finetune.plan.preflight import check_can_start, fits_a_cpu
from finetune.recipe.schema import Recipe, dump_recipe
from finetune.runs.outcome import OutOfMemory, TrainResult
from finetune.runs.plots import plot_schedule
from finetune.runs.report import finish_run, out_of_memory_report
from finetune.runs.resume import check_not_finished, resume_point
from finetune.runs.run_folder import (
    check_started_run,
    hold_run,
    make_run_dir,
    record_event,
    run_recipe,
    start_adapter,
    write_run_file,
    write_run_json,
)
from finetune.train.backend import use_backend

Say = Callable[..., None]


@dataclass
class Ended:
    """How a run ended. ``how``: "done", "refused" (over budget: nothing was loaded or made),
    "out of memory", "interrupted", "diverged", or "peer" (a torchrun rank other than 0: rank 0
    reports for the job)."""

    how: str
    job: Job
    run_dir: Path | None = None
    result: TrainResult | None = None
    lines: list[str] = field(default_factory=list)  # the ending's own lines (the OOM report, ...)


def train_run(
    recipe: Recipe,
    source: str,
    overrides: list[str] = (),
    *,
    name: str | None = None,
    probe: bool | None = None,
    force: bool = False,
    allow: bool = False,
    say: Say = print,
    warn: Callable[[list[str]], None] = lambda warnings: None,
) -> Ended:
    """A new run of ``recipe`` (read from ``source`` with ``overrides``), from plan to evaluation."""
    gpus = can_start(recipe, source, allow, warn)  # 1. can it start here at all
    job = plan_job(recipe, source, name)  # 2. the plan: data, schedule, budget, disk
    warn(job.warnings)
    where = f"{gpus[0].name} ({gpus[0].memory_gib:.0f} GiB)" if gpus else "CPU"
    say(f"{job.name} {recipe.version}: {recipe.model.name} on {where}, {job.data.rows} conversations")
    say(*job.lines())
    if job.over_budget and not force:
        return Ended("refused", job)
    if job.over_budget:
        ideas = "; ".join(job.suggestions) or "none of the usual changes is enough"
        warn([f"--force: launching although {source} is predicted not to fit (what would help: {ideas})"])
    run_dir = new_run_folder(job, source, list(overrides))  # 3. the run folder, then the heavy import
    # The probe runs by default on a GPU, where memory is the limit that ends runs, and on a CPU
    # when the recipe limits time (a CPU's step time is measured, not predicted: the probe is what
    # holds it to budget.max_step_seconds and max_hours); never under torchrun, where each process
    # would judge its own steps and could disagree.
    limits_time = recipe.budget.max_step_seconds is not None or recipe.budget.max_hours is not None
    probing = (bool(gpus) or limits_time if probe is None else probe) and not distributed.active()
    return _train_and_finish(job, run_dir, None, probing, force, allow, say)


def can_start(recipe: Recipe, source: str, allow: bool, warn: Callable[[list[str]], None]) -> list[Gpu]:
    """Refuse what cannot start here (the GPU, the model, the start adapter, the evaluation's
    settings) before anything is planned or loaded; the GPUs the run will use."""
    gpus = check_can_start(recipe, source)
    start_adapter(recipe)
    check_reward_settings(recipe, allow)
    warn(check_evaluation_settings(recipe, allow))
    return gpus


def resume_run(
    run_dir: Path,
    *,
    force: bool = False,
    allow: bool = False,
    say: Say = print,
    warn: Callable[[list[str]], None] = lambda warnings: None,
) -> Ended:
    """Continue a run from its latest sound checkpoint, with the recipe it was started with."""
    check_started_run(run_dir)  # a clear error when this is not a run folder
    check_not_finished(run_dir)  # nothing written to a finished run, not even a lock
    hold_run(run_dir)  # refused while another process still trains it
    recipe = run_recipe(run_dir)
    can_start(recipe, str(run_dir), allow, warn)
    say(f"resuming {run_dir}")
    # Changed inputs are refused here, before anything is prepared from them or torch is imported.
    checkpoint, lines = resume_point(recipe, run_dir, force)
    say(*lines)
    job = plan_job(recipe, str(run_dir), run_dir.parent.name)
    return _train_and_finish(job, run_dir, checkpoint, False, force, allow, say)


def _train_and_finish(
    job: Job, run_dir: Path, checkpoint: Path | None, probe: bool, force: bool, allow: bool, say: Say
) -> Ended:
    if distributed.is_main():
        record_event(run_dir, f"resumed from {checkpoint.name}" if checkpoint else "started at step 0")
    try:
        result = start_run(job, run_dir, checkpoint, probe, force, say)  # 4. train
    except OutOfMemory as oom:
        if distributed.is_main():
            record_event(run_dir, "stopped: out of memory")
        return Ended("out of memory", job, run_dir, None, out_of_memory_report(job, oom, run_dir))
    if not distributed.is_main():
        return Ended("peer", job, run_dir, result)
    if result.interrupted_by:
        record_event(run_dir, f"interrupted by {result.interrupted_by} after step {result.steps}")
    elif result.diverged:
        record_event(run_dir, f"stopped: diverged after step {result.steps}")
    elif result.best is not None and result.best.early_stopped:
        record_event(run_dir, f"finished at step {result.steps}: stopped early, best step {result.best.step}")
    else:
        record_event(run_dir, f"finished at step {result.steps}")
    lines = finish_run(job, run_dir, result)  # 5. finish: budget.json, report.md, the LR plot
    if result.interrupted_by or result.diverged:
        return Ended("interrupted" if result.interrupted_by else "diverged", job, run_dir, result)
    first = result.measured.first_step  # a resume's: its seconds are this process's part
    say(
        *lines,
        f"Done: {result.steps} steps"
        + (f" (from step {first} on in this process)" if first else "")
        + f" in {result.seconds:.1f} s, loss {result.first_loss:.4f} -> "
        f"{result.final_loss:.4f}; adapter "
        + (f"(the best checkpoint's, step {result.best.step}) " if result.best else "")
        + f"saved to {result.adapter_dir}",
    )
    if job.recipe.evaluate.humaneval and allow:  # 6. evaluate, when the recipe asks and may
        with progress_bar("answering") as progress:
            say(*evaluate_run(run_dir, allow, {}, [1, 10, 100], progress))
    return Ended("done", job, run_dir, result)


def join_job(verb: str) -> None:
    """Under torchrun: join the job's process group (train and resume only: everything else runs
    in one process)."""
    if not distributed.active():
        return
    if verb not in ("train", "resume"):
        raise UserError(f"{verb} runs in one process: start it with `python runner.py {verb}`, not torchrun")
    distributed.start()


def torchrun(processes: int, argv: list[str], recipe: Recipe, source: str) -> int:
    """`--gpus N`: the same command under torchrun, one process per GPU on this machine (several
    machines: run torchrun on each, see the README). Returns its exit code."""

    gpus = len(detect_gpus())
    if distributed.active():
        raise UserError("--gpus under torchrun: torchrun already started this job's processes")
    if processes < 2:
        raise UserError(f"--gpus {processes}: give 2 or more (one GPU is a plain `python runner.py`)")
    if gpus == 0 and not fits_a_cpu(recipe):
        raise UserError(
            f"--gpus {processes}: this machine has no GPU that torch can use, and {source} needs one"
        )
    if 0 < gpus < processes:
        raise UserError(f"--gpus {processes}: this machine has {gpus} GPU{'s' if gpus > 1 else ''}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "finetune", *argv]
    where = f"{processes} GPUs" if gpus else f"{processes} processes on the CPU (gloo; no GPU here)"
    print(f"torchrun: {where}: {' '.join(command[1:])}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ran_out = Path(folder) / "out-of-memory"  # written by a rank that runs out (torchrun exits 1)
        # `-m finetune` from any working directory: each worker finds the package where this one did.
        path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, distributed.OUT_OF_MEMORY_FILE: str(ran_out), "PYTHONPATH": path}
        try:
            # SIGTERM, not SIGKILL, if we die: torchrun passes it on and the workers save a checkpoint.
            code = subprocess.run(command, env=env, preexec_fn=child_setup(signal.SIGTERM)).returncode
        except KeyboardInterrupt:  # torchrun got it too, and stops its processes
            return 130
        out_of_memory = ran_out.read_text().split() if ran_out.is_file() else None
    if code != 0 and out_of_memory:
        peer, step = out_of_memory
        print(
            f"error: the job stopped: rank {peer} ran out of memory at step {step} (its report above says "
            "what to change)",
            file=sys.stderr,
        )
        return 3  # as a run in one process that runs out of memory
    if code != 0:
        print(
            f"error: the job stopped: torchrun exited with {code} (its report above names the rank); "
            "a run that saved a checkpoint continues with the same --gpus and `resume`",
            file=sys.stderr,
        )
    return code


def new_run_folder(job: Job, recipe_file: str, overrides: list[str]) -> Path:
    """runs/<name>/<timestamp>-<hash> with the resolved recipe, how it was resolved, and the plan;
    made before the heavy import, so an unusable output.dir fails in a second, and a run killed
    while the stack loads can be resumed (trained from its first step). A machine Unsloth refuses
    at that import (a UserError, see finetune/train/stack.py) leaves no folder behind."""
    use_backend(job.recipe.model.backend)
    if not distributed.is_main():  # under torchrun: rank 0 makes the folder and says where it is
        from finetune.train import stack  # noqa: F401

        return Path(distributed.from_main(None))
    run_dir = make_run_dir(job.recipe, job.name)
    hold_run(run_dir)
    write_run_file(run_dir / "recipe.yaml", dump_recipe(job.recipe))
    # The resolved recipe already holds the overridden values; this records how they got there.
    write_run_json(
        run_dir / "run.json",
        {
            "recipe": recipe_file,
            "overrides": overrides,
            "version": job.recipe.version,
            "world_size": job.plan.world_size,
        },
    )
    write_run_json(run_dir / "plan.json", plan_document(job))
    plot_schedule(job.plan, run_dir / "lr_schedule.png")
    try:
        from finetune.train import stack  # noqa: F401  (heavy: unsloth, torch, transformers, trl)
    except UserError:
        shutil.rmtree(run_dir)  # only what was just written, as may be the recipe's folder above it
        if not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()
        raise
    return Path(distributed.from_main(str(run_dir)))


def start_run(
    job: Job,
    run_dir: Path,
    resume_from: Path | None = None,
    probe: bool = False,
    force: bool = False,
    say: Callable[[str], None] = print,
):
    """Import the training stack and train into ``run_dir`` (from ``resume_from``, a checkpoint of
    it); with ``probe``, a few worst-case steps first, held to the budget (see probe_verdict).
    Returns run.TrainResult; raises run.OutOfMemory with what was saved."""
    use_backend(job.recipe.model.backend)
    from finetune.train import training  # heavy: the backend, torch, transformers, trl

    def check(measured) -> None:
        for line in probe_verdict(job, measured, force):
            say(line)

    return training.train(job.recipe, run_dir, check if probe else None, resume_from)
