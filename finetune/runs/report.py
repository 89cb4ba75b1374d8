"""The end-of-run report: report.md in the run folder, and its gist on the console (no torch).

Built from what the run folder already holds (the log, the plan, the budget record, the samples),
so a report can be written again from a finished run at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.base import distributed
from finetune.plan.calibration import (
    calibration_record,
    measured_peak_bytes,
)
from finetune.plan.constants import GIB
from finetune.plan.job import Job, budget_check
from finetune.runs.outcome import BestCheckpoint, OutOfMemory
from finetune.runs.plots import (
    logged_points,
    plot_grpo,
    plot_losses,
    plot_preference,
    plot_schedule,
    reward_names,
)
from finetune.runs.run_folder import (
    disk_full_as,
    latest_checkpoint,
    read_history,
    write_run_file,
    write_run_json,
)


def summary(history: list[dict], seconds: float, since: tuple[int, int] = (0, 0)) -> dict:
    """The figures of a run, from the trainer's log; ``seconds`` are this process's, which began at
    ``since`` (the step and trained tokens a resume started from), so its speed is over its own part."""
    train = logged_points(history, "loss")
    evaluation = logged_points(history, "eval_loss")
    tokens = max((entry.get("num_input_tokens_seen", 0) for entry in history), default=0)
    return {
        "steps": max((entry["step"] for entry in history if "step" in entry), default=0),
        "seconds": seconds,
        "resumed_at": since[0],
        "trained_tokens": tokens,
        # None where the trainer counts no tokens (ORPO's and CPO's: their batches hold no input_ids)
        "tokens_per_second": (tokens - since[1]) / seconds if seconds and tokens else None,
        "first_loss": train[0][1] if train else None,
        "final_loss": train[-1][1] if train else None,
        "best_loss": min(train, key=lambda point: point[1]) if train else None,
        "final_eval_loss": evaluation[-1][1] if evaluation else None,
        "best_eval_loss": min(evaluation, key=lambda point: point[1]) if evaluation else None,
    }


# What TRL's preference trainers log: each answer's reward (beta times its log-probability ratio to
# the reference; ORPO and SimPO: to none), their margin, and the share of pairs the chosen wins.
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_lines(history: list[dict]) -> list[str]:
    """The rewards' first and last logged values, training's and the last evaluation's; none for SFT."""
    train = {key: logged_points(history, key) for key in REWARDS}
    if not train["rewards/margins"]:
        return []

    def first_last(points: list[tuple[int, float]]) -> str:
        return f"{points[0][1]:.4f} -> {points[-1][1]:.4f}" if points else "-"

    lines = [
        f"rewards (train, first -> last logged step): chosen {first_last(train['rewards/chosen'])}, "
        f"rejected {first_last(train['rewards/rejected'])}, margin {first_last(train['rewards/margins'])}, "
        f"accuracy {first_last(train['rewards/accuracies'])}"
    ]
    evaluation = {key: logged_points(history, f"eval_{key}") for key in REWARDS}
    if evaluation["rewards/margins"]:
        last = {key.split("/")[1]: points[-1][1] for key, points in evaluation.items() if points}
        lines.append(
            f"rewards (eval, step {evaluation['rewards/margins'][-1][0]}): "
            + ", ".join(f"{name} {value:.4f}" for name, value in last.items())
        )
    return lines


def grpo_lines(history: list[dict]) -> list[str]:
    """GRPO's figures, first -> last logged step: each reward's mean (the tests reward's is the
    share of tests passed), the weighted total, the completions' length and share cut, and the KL
    when there is a reference; none for other methods."""
    names = reward_names(history)
    if not names:
        return []

    def first_last(key: str, spec: str = ".4f") -> str:
        points = logged_points(history, key)
        return f"{points[0][1]:{spec}} -> {points[-1][1]:{spec}}" if points else "-"

    lines = [
        "rewards (first -> last logged step): "
        + ", ".join(f"{name} {first_last(f'rewards/{name}/mean')}" for name in names)
        + f"; total {first_last('reward')}",
        f"completions: mean length {first_last('completions/mean_length', '.1f')} tokens, "
        f"share cut at max_completion_length {first_last('completions/clipped_ratio', '.2f')}",
    ]
    if logged_points(history, "kl"):
        lines.append(f"KL to the reference: {first_last('kl')}")
    return lines


def read_best(run_dir: Path) -> BestCheckpoint | None:
    """The best checkpoint a finished run kept (best.json), or None (none kept, or the file is damaged)."""
    try:
        return BestCheckpoint.from_dict(json.loads((run_dir / "best.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def shown_completion(text: str | None) -> str:
    """A sample's completion as report.md shows it: an empty one is said to be empty (a tiny or
    barely trained model may end its turn at once), a missing one is said to be missing."""
    if text is None:
        return "(not generated: the run did not finish)"
    return text if text.strip() else "(empty: the model ended its turn at once)"


def write_report(
    run_dir: Path, history: list[dict], seconds: float, spikes: list[dict], since: tuple[int, int] = (0, 0)
) -> tuple[Path, list[str]]:
    """report.md (with loss_curve.png) in the run folder; and the lines to print. ``seconds`` and
    ``since``: this process's training time and where it began (see summary)."""
    figures = summary(history, seconds, since)
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    budget_file = run_dir / "budget.json"
    budget = json.loads(budget_file.read_text()) if budget_file.is_file() else None
    samples_file = run_dir / "samples.json"
    samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
    kept = read_best(run_dir)
    plot_losses(history, run_dir / "loss_curve.png", kept.step if kept else None)

    best = figures["best_loss"]
    best_eval = figures["best_eval_loss"]
    console = [
        f"steps: {figures['steps']}"
        + (f" (from step {figures['resumed_at']} on in this process)" if figures["resumed_at"] else "")
        + f" in {figures['seconds']:.1f} s, "
        + (
            f"{figures['tokens_per_second']:.0f} trained tokens/s"
            if figures["tokens_per_second"] is not None
            else "trained tokens not counted by this trainer"
        ),
        f"train loss: first {_fmt(figures['first_loss'])}, final {_fmt(figures['final_loss'])}, "
        f"best {_fmt(best[1] if best else None)}" + (f" (step {best[0]})" if best else ""),
    ]
    if best_eval:
        console.append(
            f"eval loss: final {_fmt(figures['final_eval_loss'])}, "
            f"best {best_eval[1]:.4f} (step {best_eval[0]})"
        )
    if kept is not None:
        console += kept.lines()
    preference = preference_lines(history)
    console += preference
    if preference:
        plot_preference(history, run_dir / "preference.png")
    grpo = grpo_lines(history)
    console += grpo
    if grpo:
        plot_grpo(history, run_dir / "grpo.png")
    if budget:
        measured, predicted = budget["measured"], budget["predicted"]
        peak = budget.get("measured_peak_bytes")
        console.append(
            f"peak memory: {peak / GIB:.2f} GiB measured, "
            if peak is not None
            else "peak memory: not measured (CPU), "
        )
        console[-1] += f"{predicted['memory_total_bytes'] / GIB:.2f} GiB predicted"
        step = measured.get("median_step_seconds")
        said = (
            f"{predicted['step_seconds']:.3f} s predicted"
            if predicted.get("time_predicted", budget.get("device") != "CPU")
            else "not predicted on a CPU"
        )
        console.append(f"step time: {_fmt(step, '.3f')} s measured, {said}")
    warnings = [
        f"loss spike at step {s['step']}: {s['loss']:.4f} "
        f"({s['loss'] / s['running_median']:.1f}x the running median)"
        for s in spikes
    ] + list(plan.get("data", {}).get("report", []))
    planned = [w for w in plan.get("warnings", []) if isinstance(w, str)]  # what the plan warned of
    history = read_history(run_dir)

    lines = [f"# Run report: {run_dir.name}", "", "## Figures", ""]
    lines += [f"- {line}" for line in console]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in planned + warnings] or ["- none"])
    if history:
        lines += ["", "## History", ""] + [f"- {e.get('time', '')}: {e['event']}" for e in history]
    lines += [
        "",
        "## Curves",
        "",
        "![loss](loss_curve.png)",
        "",
        "![learning rate, planned and logged](lr_schedule.png)",
    ]
    if preference:
        lines += ["", "![rewards, margin and accuracy](preference.png)"]
    if grpo:
        lines += ["", "![rewards, completion lengths and KL](grpo.png)"]
    if samples:
        lines += ["", "## Samples (greedy, before and after training)", ""]
        for k, sample in enumerate(samples, start=1):
            lines += [
                f"### {k}. {sample['source']}",
                "",
                "Prompt (its end):",
                "",
                "```",
                sample["prompt"][-600:],
                "```",
                "",
                "Before:",
                "",
                "```",
                shown_completion(sample["before"]),
                "```",
                "",
                "After:",
                "",
                "```",
                shown_completion(sample.get("after")),
                "```",
                "",
            ]
    path = write_run_file(run_dir / "report.md", "\n".join(lines).rstrip() + "\n")
    return path, console + [f"warning: {w}" for w in warnings[:5]]


def put_section(path: Path, title: str, body: list[str]) -> Path:
    """report.md with its `## title` section replaced by ``body`` (or added at the end): a second
    evaluation replaces the first instead of piling up."""
    text = path.read_text() if path.is_file() else f"# Run report: {path.parent.name}\n"
    lines = text.rstrip("\n").split("\n")
    header = f"## {title}"
    if header in lines:
        start = lines.index(header)
        end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
        while lines and not lines[-1].strip():
            lines.pop()
    return write_run_file(path, "\n".join([*lines, "", header, "", *body]).rstrip() + "\n")


def out_of_memory_report(job: Job, oom: OutOfMemory, run_dir: Path) -> list[str]:
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
    batch = "micro-batch"
    if oom.evaluating:
        where = (
            "in the probe's evaluation" if oom.step is None else f"in the evaluation after step {oom.step}"
        )
        batch = "eval batch"
    if oom.rank is not None:
        where = f"on rank {oom.rank} of {distributed.world_size()} {where}"
    lines = [f"out of memory {where} ({oom.tokens} tokens in the {batch}); {saved}"]
    lines.append(f"peak memory measured: {peak}")
    budget = job.budget
    if oom.evaluating and budget is not None and budget.eval_memory is not None:
        lines.append(
            f"predicted for an evaluation: {budget.eval_memory.total / GIB:.2f} GiB (upper "
            f"{budget.eval_memory.upper / GIB:.2f} GiB); lower train.per_device_eval_batch_size "
            f"(now {job.recipe.train.per_device_eval_batch_size})"
        )
    elif budget is not None:
        lines.append(
            f"predicted: {budget.memory.total / GIB:.2f} GiB (upper {budget.memory.upper / GIB:.2f} GiB)"
        )
        recipe = job.recipe
        tighter = recipe.budget.model_copy(update={"max_memory_gib": 0.8 * budget.memory.upper / GIB})
        tighter_recipe = recipe.model_copy(update={"budget": tighter})
        _, _, ideas = budget_check(tighter_recipe, job.data, job.plan, job.device)
        if ideas:
            lines.append("changes predicted to need at least a fifth less memory:")
            lines += [f"  {idea}" for idea in ideas]
    kept = oom.checkpoint or latest_checkpoint(run_dir)[0]
    if kept is not None:
        lines.append(f"the last sound checkpoint is {kept}")
        lines.append(f"after changing the recipe, start a new run; this one is in {run_dir}")
    return lines


def finish_run(job: Job, run_dir: Path, result) -> list[str]:
    """After training: the schedule plot with the logged LRs, and for a run that finished, budget.json
    (predicted against measured) and report.md. Returns the lines to print."""
    with disk_full_as("the report", run_dir, run_dir):
        return _write_results(job, run_dir, result)


def _write_results(job: Job, run_dir: Path, result) -> list[str]:
    logged = [(e["step"], e["learning_rate"]) for e in result.log_history if "learning_rate" in e]
    plot_schedule(job.plan, run_dir / "lr_schedule.png", logged)
    if result.interrupted_by or result.diverged:
        return []
    lines = []
    if job.budget is not None:
        record = calibration_record(job.budget, result.measured.as_dict(), job.recipe.model.name, job.name)
        write_run_json(run_dir / "budget.json", record)
        step = result.measured.median_step_seconds
        if step:
            predicted = (
                f"{job.budget.time.step_seconds:.3f} s predicted ({record['step_error']:+.0%})"
                if job.budget.time_predicted
                else "not predicted on a CPU"
            )
            lines.append(f"step time: {step:.3f} s measured (median after warm-up), {predicted}")
    since = (result.measured.first_step, result.measured.first_tokens)
    report, report_lines = write_report(run_dir, result.log_history, result.seconds, result.spikes, since)
    return [*lines, *report_lines, f"report: {report}"]
