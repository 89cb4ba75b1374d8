"""How a run is put together before anything heavy is imported: its data, schedule and budget (no torch).

`train`, `plan`, `show`, `validate`, `resume` and the nightly smoke all plan through these functions,
so the predictions the smoke holds to measurements are the ones a user is shown. They return what
they found (plans, warnings, printed lines); presenting it is the command line's job.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune import distributed
from finetune.budget import (
    GIB,
    BudgetPlan,
    Device,
    Workload,
    budget_as_dict,
    describe_budget,
    plan_budget,
    suggest,
    weight_bytes,
)
from finetune.calibration import BudgetExceeded, calibration_record, measured_peak_bytes, measured_verdicts
from finetune.disk import (
    DiskPlan,
    Place,
    describe_disk,
    disk_as_dict,
    disk_verdicts,
    predict_disk,
    tokenizer_bytes,
)
from finetune.export import sixteen_bit_name
from finetune.plots import plot_schedule
from finetune.preflight import base_model, detect_gpus, fits_a_cpu, planning_config, training_device
from finetune.recipe import Recipe, UserError, dump_recipe, recipe_name
from finetune.report import write_report
from finetune.run import (
    OutOfMemory,
    clear_for_restart,
    disk_full_as,
    fingerprint_changes,
    hold_run,
    latest_checkpoint,
    make_run_dir,
    read_run,
    write_run_file,
    write_run_json,
)
from finetune.schedule import SchedulePlan, advise, describe_plan, plan_as_dict, plan_schedule
from finetune.shapes import Shapes, count_parameters, lora_parameters
from finetune.store import PADDING_FREE, DataPlan, plan_data, run_fingerprints
from finetune.tiny_model import TINY_MODEL_NAME
from finetune.trackers import check_trackers


def training_data(recipe: Recipe) -> DataPlan:
    """What the trainer will make of the training rows (token lengths, drops, packing), from the
    prepared-data store (built now if these inputs were never prepared)."""
    return plan_data(recipe, on_gpu=bool(detect_gpus()))


def data_as_dict(data: DataPlan) -> dict:
    return {
        "rows": data.rows,
        "trained_rows": None if data.lengths is None else len(data.lengths),
        "sequences": data.sequences,
        "packing": data.packing,
        "padding_free": PADDING_FREE,
        "tokenizer": data.tokenizer,
        "token_lengths": data.lengths,
        "report": data.report,
    }


def checked_plan(
    recipe: Recipe, num_examples: int, source: str, world_size: int = 1
) -> tuple[SchedulePlan, list[str]]:
    """The schedule plan and its warnings (each naming ``source``); a schedule that would be wrong
    is refused."""
    plan = plan_schedule(num_examples, recipe.train, world_size)
    errors, warnings = advise(plan, recipe.train)
    if errors:
        raise UserError("\n".join(f"{source}: {error}" for error in errors))
    return plan, [f"{source}: {warning}" for warning in warnings]


def budget_check(
    recipe: Recipe, data: DataPlan, plan: SchedulePlan, device: Device, full_length: bool = False
) -> tuple[BudgetPlan | None, list[str], list[str]]:
    """(budget plan, printed lines, suggestions when it fails); no plan when the model's shape is unknown."""
    config = planning_config(recipe)
    if config is None:
        note = f"memory and time: not predicted (no config.json for {recipe.model.name} on disk)"
        return None, [note], []
    lengths = None if full_length else data.lengths
    work = Workload(lengths, data.sequences, data.packing, plan.total_steps)
    dtype_bytes = 2 if device.is_gpu and recipe.model.dtype != "float32" else 4
    shapes = Shapes.from_config(config)
    budget = plan_budget(recipe, shapes, device, work, dtype_bytes, plan.world_size)
    ideas = [] if budget.ok else suggest(recipe, shapes, device, work, dtype_bytes, plan.world_size)
    return budget, describe_budget(budget), ideas


@dataclass(frozen=True)
class DiskCheck:
    plan: DiskPlan | None  # None when the model's shape is unknown
    verdicts: list  # budget.Verdict: the run's files (and a download elsewhere) against free space
    lines: list[str]  # the breakdown, the verdicts and the export note, as printed

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


def _place(folder: Path) -> Place:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return Place(str(folder), shutil.disk_usage(existing).free, existing.stat().st_dev)


def disk_check(recipe: Recipe, plan: SchedulePlan, device: Device) -> DiskCheck:
    """The disk the run will fill (checkpoints, adapter, its files; the base model's download when it
    is not in the cache yet) against the free space there, and export's needs beside it."""
    from huggingface_hub import constants  # light: constants only

    config = planning_config(recipe)
    if config is None:
        return DiskCheck(None, [], [f"disk: not predicted (no config.json for {recipe.model.name} on disk)"])
    shapes = Shapes.from_config(config)
    folder = base_model(recipe)["path"]
    folder = Path(folder) if folder else None
    download = 0.0
    if folder is None and recipe.model.name != TINY_MODEL_NAME:  # fetched at load, in its own form
        four_bit = sixteen_bit_name(recipe.model.name) is not None
        download = sum(weight_bytes(shapes, four_bit, 2))
    disk = predict_disk(
        recipe,
        shapes,
        plan.total_steps,
        device.is_gpu,
        tokenizer_bytes(folder),
        download,
        count_parameters(config),
    )
    verdicts, notes = disk_verdicts(
        disk, _place(Path(recipe.output.dir)), _place(Path(constants.HF_HUB_CACHE))
    )
    return DiskCheck(disk, verdicts, describe_disk(disk) + [v.line() for v in verdicts] + notes)


def disk_suggestions(recipe: Recipe, check: DiskCheck) -> list[str]:
    """What would make a failing disk check pass."""
    if check.ok or check.plan is None:
        return []
    short = max(v.predicted - v.limit for v in check.verdicts if not v.ok)
    ideas = [f"free {short:.2f} GiB there, or set output.dir to a folder on a larger disk"]
    if check.plan.checkpoints_at_once > 2 and recipe.train.save_total_limit > 1:
        saved = (check.plan.checkpoints_at_once - 2) * check.plan.checkpoint_bytes / GIB
        ideas.append(
            f"train.save_total_limit=1 (2 checkpoints at once instead of "
            f"{check.plan.checkpoints_at_once}: {saved:.2f} GiB less)"
        )
    return ideas


def parameter_counts(recipe: Recipe) -> dict | None:
    """The LoRA weights the recipe trains and the model's total, from its shape (None when unknown)."""
    config = planning_config(recipe)
    if config is None:
        return None
    shapes, lora = Shapes.from_config(config), recipe.lora
    return {
        "trainable": lora_parameters(shapes, lora.r, lora.target_modules, lora.use_dora),
        "total": count_parameters(config),
        "dora": lora.use_dora,
    }


def describe_parameters(counts: dict | None) -> list[str]:
    if counts is None:
        return []
    share = counts["trainable"] / counts["total"]
    kind = "DoRA" if counts.get("dora") else "LoRA"
    return [f"parameters: {counts['trainable']:,} trainable ({kind}), {share:.2%} of {counts['total']:,}"]


def plan_document(job: Launch, suggestions: list[str] | None = None) -> dict:
    """What `plan --json` prints and a run folder's plan.json holds: the schedule with the LR of every
    step, the data, the parameters, the budget, the disk and (for `plan`) the changes that would fit."""
    document = {**plan_as_dict(job.plan), "data": data_as_dict(job.data)}
    document["parameters"] = parameter_counts(job.recipe)
    document["budget"] = budget_as_dict(job.budget) if job.budget else None
    document["disk"] = disk_as_dict(job.disk.plan, job.disk.verdicts) if job.disk and job.disk.plan else None
    if suggestions is not None:
        document["suggestions"] = suggestions
    return document


@dataclass
class Launch:
    """Everything known about a run before anything heavy is imported: what `plan` prints and what
    `train`, `resume` and the smoke start from."""

    recipe: Recipe
    source: str  # the recipe file (or, for a resume, the run folder) that errors name
    name: str  # the run's folder under output.dir
    data: DataPlan
    plan: SchedulePlan
    device: Device
    budget: BudgetPlan | None
    budget_lines: list[str]
    warnings: list[str]
    suggestions: list[str]  # changes predicted to fit, when the budget or the disk check fails
    disk: DiskCheck

    @property
    def over_budget(self) -> bool:
        return (self.budget is not None and not self.budget.ok) or not self.disk.ok

    def lines(self) -> list[str]:
        return self.data.describe() + describe_plan(self.plan) + self.budget_lines + self.disk.lines


def check_four_bit_base(recipe: Recipe, source: str) -> None:
    """Refuse model.load_in_4bit: false on a base stored quantized to 4-bit: both engines load such a
    checkpoint in 4-bit whatever the recipe says (its config carries the quantization), so the plan,
    which would count 16-bit weights, would not be what trains."""
    config = planning_config(recipe) or {}
    original = sixteen_bit_name(recipe.model.name)
    if recipe.model.load_in_4bit or ("quantization_config" not in config and original is None):
        return
    other = f" ({original})" if original else ""
    raise UserError(
        f"{source}: model.load_in_4bit is false, but {recipe.model.name} is stored quantized to 4-bit, "
        "so it would train in 4-bit, not as planned; set model.load_in_4bit: true, or name its 16-bit "
        f"original{other} in model.name"
    )


def plan_launch(
    recipe: Recipe,
    source: str,
    name: str | None = None,
    device: Device | None = None,
    full_length: bool = False,
    world_size: int | None = None,
) -> Launch:
    """Data, schedule, device and budget for one run of the recipe file ``source`` (``name``: its
    folder under output.dir, the file's stem unless given; ``device``: this machine unless given;
    ``world_size``: the processes training together, this job's under torchrun unless given)."""
    name = name or recipe_name(source)
    check_four_bit_base(recipe, source)
    problems = check_trackers(recipe.output.report_to)
    if problems:
        raise UserError("\n".join(f"{source}: {problem}" for problem in problems))
    with distributed.main_first():  # under torchrun the store is built once, by rank 0
        data = training_data(recipe)
    plan, warnings = checked_plan(recipe, data.sequences, source, world_size or distributed.world_size())
    device = device or training_device()
    budget, budget_lines, suggestions = budget_check(recipe, data, plan, device, full_length)
    budget_lines = describe_parameters(parameter_counts(recipe)) + budget_lines
    disk = disk_check(recipe, plan, device)
    suggestions = suggestions + disk_suggestions(recipe, disk)
    return Launch(recipe, source, name, data, plan, device, budget, budget_lines, warnings, suggestions, disk)


def resume_point(recipe: Recipe, run_dir: Path, force: bool) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume continues from, and the lines to print about it. The run's inputs are
    compared with its manifest first, so changed inputs are refused (unless ``force``) before
    anything is prepared from them or anything heavy is imported. A run that died before its first
    sound checkpoint (in data preparation, model loading, its first steps) is trained again from
    the first step in the same folder: None."""
    lines = []
    if (run_dir / "manifest.json").is_file():  # not yet written when it died loading the model
        changes = fingerprint_changes(read_run(run_dir)["fingerprints"], run_fingerprints(recipe))
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
        # Finished without a checkpoint (save_steps past its last step): training it again would
        # replace the adapter it made.
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
    started = json.loads(run_file.read_text()).get("world_size", 1) if run_file.is_file() else 1
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
    import signal
    import subprocess
    import tempfile

    from finetune.processes import child_setup

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
    command += [str(Path(__file__).resolve().parent.parent / "runner.py"), *argv]
    where = f"{processes} GPUs" if gpus else f"{processes} processes on the CPU (gloo; no GPU here)"
    print(f"torchrun: {where}: {' '.join(command[1:])}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ran_out = Path(folder) / "out-of-memory"  # written by a rank that runs out (torchrun exits 1)
        env = {**os.environ, distributed.OUT_OF_MEMORY_FILE: str(ran_out)}
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


def use_backend(backend: str) -> None:
    """Choose this process's training engine (recipe.model.backend) before the training stack is
    first imported; once it is, the engine is fixed (Unsloth patches libraries process-wide)."""
    loaded = sys.modules.get("finetune.stack")
    if loaded is None:
        os.environ["FINETUNE_BACKEND"] = backend
    elif loaded.BACKEND != backend:
        raise UserError(
            f"model.backend: {backend}: this process already runs the {loaded.BACKEND} backend; "
            "start the run in a process of its own"
        )


def inference_stack(recipe: Recipe):
    """finetune.inference on the backend ``recipe`` trained with (heavy)."""
    use_backend(recipe.model.backend)
    from finetune import inference

    return inference


def new_run_folder(launch: Launch, recipe_file: str, overrides: list[str]) -> Path:
    """runs/<name>/<timestamp>-<hash> with the resolved recipe, how it was resolved, and the plan;
    made before the heavy import, so an unusable output.dir fails in a second, and a run killed
    while the stack loads can be resumed (trained from its first step). A machine Unsloth refuses
    at that import (a UserError, see finetune/stack.py) leaves no folder behind."""
    use_backend(launch.recipe.model.backend)
    if not distributed.is_main():  # under torchrun: rank 0 makes the folder and says where it is
        from finetune import stack  # noqa: F401

        return Path(distributed.from_main(None))
    run_dir = make_run_dir(launch.recipe, launch.name)
    hold_run(run_dir)
    write_run_file(run_dir / "recipe.yaml", dump_recipe(launch.recipe))
    # The resolved recipe already holds the overridden values; this records how they got there.
    write_run_json(
        run_dir / "run.json",
        {
            "recipe": recipe_file,
            "overrides": overrides,
            "version": launch.recipe.version,
            "world_size": launch.plan.world_size,
        },
    )
    write_run_json(run_dir / "plan.json", plan_document(launch))
    plot_schedule(launch.plan, run_dir / "lr_schedule.png")
    try:
        from finetune import stack  # noqa: F401  (heavy: unsloth, torch, transformers, trl)
    except UserError:
        shutil.rmtree(run_dir)  # only what was just written, as may be the recipe's folder above it
        if not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()
        raise
    return Path(distributed.from_main(str(run_dir)))


def probe_verdict(launch: Launch, measured, force: bool) -> list[str]:
    """The probe's measurement held to the budget: the lines to print; raises BudgetExceeded when it
    breaks the budget, unless ``force``."""
    peak = measured.peak_reserved
    lines = [
        f"probe: {len(measured.step_seconds)} steps on the worst-case micro-batch, "
        f"{measured.median_step_seconds:.2f} s per step"
        + (f", peak memory {measured_peak_bytes(peak) / GIB:.2f} GiB" if peak is not None else "")
    ]
    if launch.budget is None:
        return lines
    verdicts = measured_verdicts(
        launch.recipe, launch.budget, measured.median_step_seconds, peak, launch.plan.total_steps
    )
    lines += [verdict.line() for verdict in verdicts]
    failed = [v.line() for v in verdicts if not v.ok]
    if failed and not force:
        raise BudgetExceeded("; ".join(failed))
    if failed:
        lines.append("warning: --force: training although the probe broke the budget")
    return lines


def start_run(
    launch: Launch,
    run_dir: Path,
    resume_from: Path | None = None,
    probe: bool = False,
    force: bool = False,
    say: Callable[[str], None] = print,
):
    """Import the training stack and train into ``run_dir`` (from ``resume_from``, a checkpoint of
    it); with ``probe``, a few worst-case steps first, held to the budget (see probe_verdict).
    Returns run.TrainResult; raises run.OutOfMemory with what was saved."""
    use_backend(launch.recipe.model.backend)
    from finetune import train  # heavy: the backend, torch, transformers, trl

    def check(measured) -> None:
        for line in probe_verdict(launch, measured, force):
            say(line)

    return train.train(launch.recipe, run_dir, check if probe else None, resume_from)


def out_of_memory_report(launch: Launch, oom: OutOfMemory, run_dir: Path) -> list[str]:
    """What ran out against what was predicted, and changes predicted to need a fifth less memory;
    under torchrun, where another process ran out, one line that says so (that one reports)."""
    if oom.rank is not None and oom.rank != distributed.rank():
        return [
            f"rank {oom.rank} of this torchrun job ran out of memory at step {oom.step}, so this process "
            f"(rank {distributed.rank()}) stopped too; rank {oom.rank}'s report says what to change"
        ]
    saved = f"saved {oom.checkpoint.name}" if oom.checkpoint else f"not saved: {oom.unsaved}"
    peak = measured_peak_bytes(oom.peak_reserved)
    peak = f"{peak / GIB:.2f} GiB" if peak is not None else "not measured on the CPU"
    where = "in the probe, on the worst-case micro-batch" if oom.step is None else f"at step {oom.step}"
    if oom.rank is not None:
        where = f"on rank {oom.rank} of {distributed.world_size()} {where}"
    lines = [f"out of memory {where} ({oom.tokens} tokens in the micro-batch); {saved}"]
    lines.append(f"peak memory measured: {peak}")
    budget = launch.budget
    if budget is not None:
        lines.append(
            f"predicted: {budget.memory.total / GIB:.2f} GiB (upper {budget.memory.upper / GIB:.2f} GiB)"
        )
        recipe = launch.recipe
        tighter = recipe.budget.model_copy(update={"max_memory_gib": 0.8 * budget.memory.upper / GIB})
        tighter_recipe = recipe.model_copy(update={"budget": tighter})
        _, _, ideas = budget_check(tighter_recipe, launch.data, launch.plan, launch.device)
        if ideas:
            lines.append("changes predicted to need at least a fifth less memory:")
            lines += [f"  {idea}" for idea in ideas]
    kept = oom.checkpoint or latest_checkpoint(run_dir)[0]
    if kept is not None:
        lines.append(f"the last sound checkpoint is {kept}")
        lines.append(f"after changing the recipe, start a new run; this one is in {run_dir}")
    return lines


def finish_run(launch: Launch, run_dir: Path, result) -> list[str]:
    """After training: the schedule plot with the logged LRs, and for a run that finished, budget.json
    (predicted against measured) and report.md. Returns the lines to print."""
    with disk_full_as("the report", run_dir, run_dir):
        return _write_results(launch, run_dir, result)


def _write_results(launch: Launch, run_dir: Path, result) -> list[str]:
    logged = [(e["step"], e["learning_rate"]) for e in result.log_history if "learning_rate" in e]
    plot_schedule(launch.plan, run_dir / "lr_schedule.png", logged)
    if result.interrupted_by or result.diverged:
        return []
    lines = []
    if launch.budget is not None:
        record = calibration_record(
            launch.budget, result.measured.as_dict(), launch.recipe.model.name, launch.name
        )
        write_run_json(run_dir / "budget.json", record)
        step = result.measured.median_step_seconds
        if step:
            lines.append(
                f"step time: {step:.3f} s measured (median after warm-up), "
                f"{launch.budget.time.step_seconds:.3f} s predicted ({record['step_error']:+.0%})"
            )
    report, report_lines = write_report(run_dir, result.log_history, result.seconds, result.spikes)
    return [*lines, *report_lines, f"report: {report}"]
