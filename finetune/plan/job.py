"""How a run is put together before anything heavy is imported: its data, schedule and budget (no torch).

`train`, `plan`, `show`, `validate`, `resume` and the nightly smoke all plan through these functions,
so the predictions the smoke holds to measurements are the ones a user is shown. They return what
they found (plans, warnings, printed lines); presenting it is the command line's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.base import distributed, sandbox
from finetune.base.errors import UserError
from finetune.base.files import filesystem, free_bytes, writable_place
from finetune.models.base import base_model, planning_config, sixteen_bit_name
from finetune.models.shapes import Shapes, count_parameters, lora_parameters
from finetune.models.tiny_model import TINY_MODEL_NAME
from finetune.plan.budget import (
    BudgetPlan,
    Workload,
    budget_as_dict,
    describe_budget,
    plan_budget,
    suggest,
    weight_bytes,
    weights_exceed,
)
from finetune.plan.constants import GIB
from finetune.plan.data_plan import (
    DataPlan,
    check_held_out,
    check_overlap,
    contamination_warnings,
    data_as_dict,
    training_data,
)
from finetune.plan.devices import Device, training_device
from finetune.plan.disk import (
    DiskPlan,
    Place,
    describe_disk,
    disk_as_dict,
    disk_verdicts,
    predict_disk,
    tokenizer_bytes,
)
from finetune.plan.preflight import check_model_name
from finetune.plan.schedule import (
    SchedulePlan,
    advise,
    count_evaluations,
    describe_plan,
    eval_every,
    plan_as_dict,
    plan_schedule,
)
from finetune.plan.trackers import check_trackers
from finetune.recipe.documents import shipped_recipes
from finetune.recipe.schema import Recipe, load_recipe, recipe_name

MOST_STEPS = 10**12  # past any run at any speed, whatever the model; refused before anything else
YEAR = 365.25 * 24 * 3600
LONGEST_RUN_SECONDS = YEAR  # a prediction past this is a mistaken step count, not a plan


def _steps_set_by(recipe: Recipe) -> str:
    train = recipe.train
    if train.max_steps is not None:
        return (
            f"train.max_steps={train.max_steps:.3g}"
            if train.max_steps > 1e9
            else f"train.max_steps={train.max_steps}"
        )
    return f"train.num_train_epochs={train.num_train_epochs:g}"


def checked_plan(
    recipe: Recipe, num_examples: int, source: str, world_size: int = 1
) -> tuple[SchedulePlan, list[str]]:
    """The schedule plan and its warnings (each naming ``source``); a schedule that would be wrong
    is refused."""
    plan = plan_schedule(num_examples, recipe.train, world_size)
    if plan.total_steps > MOST_STEPS:
        raise UserError(
            f"{source}: {_steps_set_by(recipe)} makes {plan.total_steps:.3g} optimizer steps; even at 1 ms "
            f"a step that is {plan.total_steps / 1000 / YEAR:.3g} years: lower it"
        )
    errors, warnings = advise(plan, recipe.train)
    if errors:
        raise UserError("\n".join(f"{source}: {error}" for error in errors))
    return plan, [f"{source}: {warning}" for warning in warnings]


def tests_reward_speed(recipe: Recipe) -> tuple[float | None, int]:
    """GRPO's tests reward: (seconds a program costs a sandbox worker here, measured now; the
    workers at once), or (None, 1) without that reward or where no program can be run."""
    if not recipe.train.grpo() or not any(e.reward == "tests" for e in recipe.reward_entries()):
        return None, 1
    workers = sandbox.default_workers()
    if sandbox.isolation() is not None:  # measured only as it will run: confined (or refused)
        return None, workers
    return sandbox.seconds_per_program(workers), workers


def budget_check(
    recipe: Recipe, data: DataPlan, plan: SchedulePlan, device: Device, full_length: bool = False
) -> tuple[BudgetPlan | None, list[str], list[str]]:
    """(budget plan, printed lines, suggestions when it fails); no plan when the model's shape is unknown."""
    config = planning_config(recipe)
    if config is None:
        note = f"memory and time: not predicted (no config.json for {recipe.model.name} on disk)"
        return None, [note], []
    lengths = None if full_length else data.lengths
    program_seconds, workers = tests_reward_speed(recipe)
    work = Workload(
        lengths,
        data.sequences,
        data.packing,
        plan.total_steps,
        eval_lengths=None if full_length else data.eval_lengths,
        eval_sequences=data.eval_sequences,
        evaluations=count_evaluations(recipe.train, plan.total_steps) if data.eval_rows else 0,
        eval_every=eval_every(recipe.train, plan.total_steps),
        program_seconds=program_seconds,
        sandbox_workers=workers,
    )
    dtype_bytes = 2 if device.is_gpu and recipe.model.dtype != "float32" else 4
    shapes = Shapes.from_config(config)
    budget = plan_budget(recipe, shapes, device, work, dtype_bytes, plan.world_size)
    if budget.time.total_seconds > LONGEST_RUN_SECONDS:
        raise UserError(
            f"{_steps_set_by(recipe)}: {plan.total_steps:,} optimizer steps would take "
            f"{budget.time.total_seconds / YEAR:.3g} years at {budget.time.step_seconds:.3g} s a step "
            f"on {device.name}: lower it"
        )
    ideas = [] if budget.ok else suggest(recipe, shapes, device, work, dtype_bytes, plan.world_size)
    if not budget.ok and weights_exceed(budget, device):
        ideas += recipes_for(device, recipe)
    allowed = (
        None if lengths is None else recipe.train.per_device_train_batch_size * recipe.model.max_seq_length
    )
    lines = describe_budget(budget, allowed)
    limits = [k for k in ("max_step_seconds", "max_hours") if getattr(recipe.budget, k) is not None]
    if limits and not budget.time_predicted:
        lines.append(
            f"  ({' and '.join(f'budget.{k}' for k in limits)}: checked on a CPU against the steps "
            "the probe measures before training, not by the plan)"
        )
    return budget, lines, ideas


def recipes_for(device: Device, planned: Recipe) -> list[str]:
    """The shipped recipes of the largest model that fits ``device`` with every micro-batch at full
    length: what to train on this card instead of a model whose weights alone exceed it."""
    fitting = []
    for path in shipped_recipes():
        recipe = load_recipe(path)
        config = planning_config(recipe)
        if config is None or recipe == planned or recipe.train.method_name() != planned.train.method_name():
            continue  # another method is no substitute
        work = Workload(None, 1, recipe.data.packing, 1)  # memory alone: the step count is moot
        if plan_budget(recipe, Shapes.from_config(config), device, work).memory_fits:
            fitting.append((count_parameters(config), path.stem, recipe.model.name))
    if not fitting:
        return []
    largest = max(size for size, _, _ in fitting)
    names = [name for size, name, _ in fitting if size == largest]
    model = next(model for size, _, model in fitting if size == largest)
    listed = ", ".join(sorted(names))
    return [f"shipped recipes that fit the {device.name}, of the largest model ({model}): {listed}"]


@dataclass(frozen=True)
class DiskCheck:
    plan: DiskPlan | None  # None when the model's shape is unknown
    verdicts: list  # budget.Verdict: the run's files (and a download elsewhere) against free space
    lines: list[str]  # the breakdown, the verdicts and the export note, as printed

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


def _place(folder: Path) -> Place:
    return Place(str(folder), free_bytes(folder), filesystem(folder))


def disk_check(recipe: Recipe, plan: SchedulePlan, device: Device) -> DiskCheck:
    """The disk the run will fill (checkpoints, adapter, its files; the base model's download when it
    is not in the cache yet) against the free space there, and export's needs beside it."""
    from huggingface_hub import constants  # light: constants only

    unwritable = writable_place(Path(recipe.output.dir))
    if unwritable:  # before free space is compared: /proc has none, and that is not the point
        raise UserError(
            f"output.dir '{recipe.output.dir}' cannot be written: {unwritable}; set output.dir to a "
            "folder you can write"
        )
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


def plan_document(job: Job, suggestions: list[str] | None = None) -> dict:
    """What `plan --json` prints and a run folder's plan.json holds: the schedule with the LR of every
    step, the data, the parameters, the budget, the disk and (for `plan`) the changes that would fit."""
    document = {**plan_as_dict(job.plan), "data": data_as_dict(job.data)}
    document["parameters"] = parameter_counts(job.recipe)
    document["budget"] = budget_as_dict(job.budget) if job.budget else None
    document["disk"] = disk_as_dict(job.disk.plan, job.disk.verdicts) if job.disk and job.disk.plan else None
    document["warnings"] = list(job.warnings)  # what the plan warned of, for the run's report
    if suggestions is not None:
        document["suggestions"] = suggestions
    return document


@dataclass
class Job:
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


def plan_job(
    recipe: Recipe,
    source: str,
    name: str | None = None,
    device: Device | None = None,
    full_length: bool = False,
    world_size: int | None = None,
) -> Job:
    """Data, schedule, device and budget for one run of the recipe file ``source`` (``name``: its
    folder under output.dir, the file's stem unless given; ``device``: this machine unless given;
    ``world_size``: the processes training together, this job's under torchrun unless given)."""
    name = name or recipe_name(source)
    check_model_name(recipe, source)
    check_four_bit_base(recipe, source)
    problems = check_trackers(recipe.output.report_to)
    if problems:
        raise UserError("\n".join(f"{source}: {problem}" for problem in problems))
    with distributed.main_first():  # under torchrun the store is built once, by rank 0
        data = training_data(recipe)
    overlap = check_overlap(recipe, data, source)
    check_held_out(recipe, data, source)
    plan, warnings = checked_plan(recipe, data.sequences, source, world_size or distributed.world_size())
    warnings += ([overlap] if overlap else []) + contamination_warnings(data, source)
    device = device or training_device()
    budget, budget_lines, suggestions = budget_check(recipe, data, plan, device, full_length)
    budget_lines = describe_parameters(parameter_counts(recipe)) + budget_lines
    disk = disk_check(recipe, plan, device)
    suggestions = suggestions + disk_suggestions(recipe, disk)
    return Job(recipe, source, name, data, plan, device, budget, budget_lines, warnings, suggestions, disk)
