"""How a run is put together before anything heavy is imported: its data, schedule and budget (no torch).

`train`, `plan`, `show`, `validate`, `resume` and the nightly smoke all plan through these functions,
so the predictions the smoke holds to measurements are the ones a user is shown. They return what
they found (plans, warnings, printed lines); presenting it is the command line's job.
"""

from __future__ import annotations

from finetune.budget import (
    BudgetPlan,
    Device,
    Shapes,
    Workload,
    budget_as_dict,
    describe_budget,
    plan_budget,
    suggest,
)
from finetune.preflight import detect_gpus, planning_config
from finetune.recipe import Recipe, RecipeError
from finetune.schedule import SchedulePlan, advise, plan_as_dict, plan_schedule
from finetune.store import DataPlan, plan_data


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
        "tokenizer": data.tokenizer,
        "token_lengths": data.lengths,
        "report": data.report,
    }


def checked_plan(recipe: Recipe, num_examples: int, source: str) -> tuple[SchedulePlan, list[str]]:
    """The schedule plan and its warnings (each naming ``source``); a schedule that would be wrong
    is refused."""
    plan = plan_schedule(num_examples, recipe.train)
    errors, warnings = advise(plan, recipe.train)
    if errors:
        raise RecipeError("\n".join(f"{source}: {error}" for error in errors))
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
    budget = plan_budget(recipe, shapes, device, work, dtype_bytes)
    ideas = [] if budget.ok else suggest(recipe, shapes, device, work, dtype_bytes)
    return budget, describe_budget(budget), ideas


def plan_document(
    data: DataPlan, plan: SchedulePlan, budget: BudgetPlan | None, suggestions: list[str] | None = None
) -> dict:
    """What `plan --json` prints and a run folder's plan.json holds: the schedule with the LR of every
    step, the data, the budget and (for `plan`) the changes that would fit."""
    document = {**plan_as_dict(plan), "data": data_as_dict(data)}
    document["budget"] = budget_as_dict(budget) if budget else None
    if suggestions is not None:
        document["suggestions"] = suggestions
    return document
