"""PNG plots (matplotlib, no torch): the LR schedule preview, and the LR the trainer logged over it."""

from __future__ import annotations

from pathlib import Path

from finetune.schedule import MILESTONES, SchedulePlan


def plot_schedule(plan: SchedulePlan, path: Path, logged: list[tuple[int, float]] = ()) -> Path:
    """The planned LR per optimizer step, warmup end and milestones marked; logged LRs on top if given."""
    # The object API with the Agg canvas, not pyplot: files only (no display here or on a GPU
    # server), and importing pyplot alone would cost `plan` a third of a second.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = list(range(1, plan.total_steps + 1))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, plan.lrs, color="tab:blue", linewidth=2, label=f"planned ({plan.scheduler})")
    if plan.warmup_steps:
        ax.axvline(plan.warmup_steps + 1, color="tab:orange", linestyle="--", linewidth=1)
        ax.annotate(
            f"warmup ends (step {plan.warmup_steps + 1})",
            (plan.warmup_steps + 1, plan.peak_lr),
            textcoords="offset points",
            xytext=(6, -30),
            fontsize=8,
            color="tab:orange",
        )
    for fraction in MILESTONES:
        step, lr = plan.lr_at_fraction(fraction)
        ax.plot([step], [lr], "o", color="tab:blue", markersize=4)
        ax.annotate(f"{lr:.2e}", (step, lr), textcoords="offset points", xytext=(4, 6), fontsize=8)
    if logged:
        ax.plot(*zip(*logged, strict=True), "x", color="tab:red", markersize=5, label="logged by the trainer")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"{plan.total_steps} steps, {plan.warmup_steps} warmup, "
        f"peak {plan.peak_lr:.2e}, last {plan.final_lr:.2e}"
    )
    ax.set_xlim(0, plan.total_steps + 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_lengths(lengths: list[int], max_seq_length: int, path: Path) -> Path:
    """Histogram of token lengths per row, with max_seq_length marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="tab:blue")
    ax.axvline(
        max_seq_length, color="tab:red", linestyle="--", linewidth=1, label=f"max_seq_length {max_seq_length}"
    )
    ax.set_xlabel("tokens per row (after the length policy)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(lengths)} rows, longest {max(lengths) if lengths else 0} tokens")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
