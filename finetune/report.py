"""The end-of-run report: report.md in the run folder, and its gist on the console (no torch).

Built from what the run folder already holds (the log, the plan, the budget record, the samples),
so a report can be written again from a finished run at any time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.budget import GIB
from finetune.run import write_run_file


def _loss_points(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry and math.isfinite(entry[key])]


def plot_losses(history: list[dict], path: Path) -> Path:
    """Training loss per logged step, and the eval loss where it was computed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = _loss_points(history, "loss")
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1.5, label="train loss")
    evaluation = _loss_points(history, "eval_loss")
    if evaluation:
        ax.plot(*zip(*evaluation, strict=True), "o-", color="tab:orange", markersize=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def summary(history: list[dict], seconds: float) -> dict:
    """The figures of a run, from the trainer's log."""
    train = _loss_points(history, "loss")
    evaluation = _loss_points(history, "eval_loss")
    tokens = max((entry.get("num_input_tokens_seen", 0) for entry in history), default=0)
    return {
        "steps": max((entry["step"] for entry in history if "step" in entry), default=0),
        "seconds": seconds,
        "trained_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds else None,
        "first_loss": train[0][1] if train else None,
        "final_loss": train[-1][1] if train else None,
        "best_loss": min(train, key=lambda point: point[1]) if train else None,
        "final_eval_loss": evaluation[-1][1] if evaluation else None,
        "best_eval_loss": min(evaluation, key=lambda point: point[1]) if evaluation else None,
    }


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def shown_completion(text: str | None) -> str:
    """A sample's completion as report.md shows it: an empty one is said to be empty (a tiny or
    barely trained model may end its turn at once), a missing one is said to be missing."""
    if text is None:
        return "(not generated: the run did not finish)"
    return text if text.strip() else "(empty: the model ended its turn at once)"


def write_report(
    run_dir: Path, history: list[dict], seconds: float, spikes: list[dict]
) -> tuple[Path, list[str]]:
    """report.md (with loss_curve.png) in the run folder; and the lines to print."""
    figures = summary(history, seconds)
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    budget_file = run_dir / "budget.json"
    budget = json.loads(budget_file.read_text()) if budget_file.is_file() else None
    samples_file = run_dir / "samples.json"
    samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
    plot_losses(history, run_dir / "loss_curve.png")

    best = figures["best_loss"]
    best_eval = figures["best_eval_loss"]
    console = [
        f"steps: {figures['steps']} in {figures['seconds']:.1f} s, "
        f"{_fmt(figures['tokens_per_second'], '.0f')} trained tokens/s",
        f"train loss: first {_fmt(figures['first_loss'])}, final {_fmt(figures['final_loss'])}, "
        f"best {_fmt(best[1] if best else None)}" + (f" (step {best[0]})" if best else ""),
    ]
    if best_eval:
        console.append(
            f"eval loss: final {_fmt(figures['final_eval_loss'])}, "
            f"best {best_eval[1]:.4f} (step {best_eval[0]})"
        )
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
        console.append(
            f"step time: {_fmt(step, '.3f')} s measured, {predicted['step_seconds']:.3f} s predicted"
        )
    warnings = [
        f"loss spike at step {s['step']}: {s['loss']:.4f} "
        f"({s['loss'] / s['running_median']:.1f}x the running median)"
        for s in spikes
    ] + list(plan.get("data", {}).get("report", []))

    lines = [f"# Run report: {run_dir.name}", "", "## Figures", ""]
    lines += [f"- {line}" for line in console]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in warnings] or ["- none"])
    lines += [
        "",
        "## Curves",
        "",
        "![loss](loss_curve.png)",
        "",
        "![learning rate, planned and logged](lr_schedule.png)",
    ]
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
