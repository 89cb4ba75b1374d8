"""PNG plots (no torch): the LR schedule preview with the LR the trainer logged over it, the loss
curve, the preference rewards, and the token-length histogram.

The LR chart is drawn with Pillow rather than matplotlib because `plan` draws it and must answer in
under a second: importing matplotlib alone takes 0.7-1 s on a 2-core machine, Pillow 0.1 s.
"""

from __future__ import annotations

import math
from pathlib import Path

from finetune.plan.schedule import MILESTONES, SchedulePlan

WIDTH, HEIGHT = 900, 500
LEFT, RIGHT, TOP, BOTTOM = 90, 30, 50, 60  # margins around the plotting area, in pixels
BLUE, ORANGE, RED, GREY, BLACK = (31, 119, 180), (255, 127, 14), (214, 39, 40), (225, 225, 225), (0, 0, 0)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Ticks 0, s, 2s, ... up to at least `high`, with s = 1, 2 or 5 times a power of ten."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [k * step for k in range(math.ceil(high / step - 1e-9) + 1)]


def _tick_label(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if step >= 1:
        return f"{value:.0f}"
    return f"{value:.1e}"


def plot_schedule(plan: SchedulePlan, path: Path, logged: list[tuple[int, float]] = ()) -> Path:
    """The planned LR per optimizer step, warmup end and milestones marked; logged LRs on top if given."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    x_ticks = nice_ticks(plan.total_steps + 1, count=8)
    y_ticks = nice_ticks(max([plan.peak_lr, *(lr for _, lr in logged)]) * 1.05)
    x_max, y_max = x_ticks[-1], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(step: float, lr: float) -> tuple[float, float]:
        return LEFT + step / x_max * plot_w, TOP + plot_h - lr / y_max * plot_h

    for tick in x_ticks:
        x, _ = xy(tick, 0)
        draw.line([(x, TOP), (x, TOP + plot_h)], fill=GREY)
        draw.text((x, TOP + plot_h + 6), _tick_label(tick, x_ticks[1]), font=small, fill=BLACK, anchor="mt")
    for tick in y_ticks:
        _, y = xy(0, tick)
        draw.line([(LEFT, y), (LEFT + plot_w, y)], fill=GREY)
        draw.text((LEFT - 6, y), _tick_label(tick, y_ticks[1]), font=small, fill=BLACK, anchor="rm")
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline=BLACK)

    # One point per step (sampled past PLOT_POINTS); a few steps are drawn as the steps they are.
    points = [xy(step, lr) for step, lr in plan.lrs.sampled()]
    if len(points) == 1:
        draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=BLUE)
    draw.line(points, fill=BLUE, width=2, joint="curve")
    if plan.warmup_steps:
        x, _ = xy(plan.warmup_steps + 1, 0)
        for y in range(TOP, TOP + plot_h, 10):  # dashed
            draw.line([(x, y), (x, min(y + 5, TOP + plot_h))], fill=ORANGE, width=1)
        draw.text((x + 6, TOP + 20), f"warmup ends (step {plan.warmup_steps + 1})", font=small, fill=ORANGE)
    for fraction in MILESTONES:
        step, lr = plan.lr_at_fraction(fraction)
        x, y = xy(step, lr)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=BLUE)
        draw.text((x + 4, y - 6), f"{lr:.2e}", font=small, fill=BLACK, anchor="lb")
    for step, lr in logged:
        x, y = xy(step, lr)
        draw.line([(x - 4, y - 4), (x + 4, y + 4)], fill=RED, width=2)
        draw.line([(x - 4, y + 4), (x + 4, y - 4)], fill=RED, width=2)

    legend = [(BLUE, f"planned ({plan.scheduler})")] + ([(RED, "logged by the trainer")] if logged else [])
    for row, (color, label) in enumerate(legend):
        y = TOP + 12 + 18 * row
        draw.line([(LEFT + plot_w - 190, y), (LEFT + plot_w - 165, y)], fill=color, width=3)
        draw.text((LEFT + plot_w - 158, y), label, font=small, fill=BLACK, anchor="lm")
    title = (
        f"{plan.total_steps} steps, {plan.warmup_steps} warmup, "
        f"peak {plan.peak_lr:.2e}, last {plan.final_lr:.2e}"
    )
    draw.text((WIDTH / 2, TOP / 2), title, font=font, fill=BLACK, anchor="mm")
    draw.text((LEFT + plot_w / 2, HEIGHT - 14), "optimizer step", font=font, fill=BLACK, anchor="mb")
    label = Image.new("RGB", (200, 20), "white")
    ImageDraw.Draw(label).text((100, 10), "learning rate", font=font, fill=BLACK, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, TOP + plot_h // 2 - 100))
    image.save(path)
    return path


def _figure(width: float):
    """A matplotlib figure drawn without a display (matplotlib imported here: `plan` never needs it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _saved(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def logged_points(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of each logged entry holding a finite ``key``."""
    return [(entry["step"], entry[key]) for entry in history if key in entry and math.isfinite(entry[key])]


def plot_losses(history: list[dict], path: Path, best_step: int | None = None) -> Path:
    """Training loss per logged step, the eval loss where it was computed, and the step of the best
    checkpoint when the run kept one."""
    fig = _figure(8)
    ax = fig.add_subplot()
    train = logged_points(history, "loss")
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1.5, label="train loss")
    evaluation = logged_points(history, "eval_loss")
    if evaluation:
        ax.plot(*zip(*evaluation, strict=True), "o-", color="tab:orange", markersize=4, label="eval loss")
    if best_step is not None:
        ax.axvline(best_step, color="tab:green", linestyle=":", label=f"best checkpoint (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _saved(fig, path)


def plot_preference(history: list[dict], path: Path) -> Path:
    """The chosen and rejected rewards per logged step (eval's as points), and the margin and
    accuracy beside them."""
    fig = _figure(10)
    rewards, margin = fig.subplots(1, 2)
    for key, color in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red")):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            points = logged_points(history, prefix + key)
            if points:
                label = f"{'eval ' if prefix else ''}{key.split('/')[1]}"
                rewards.plot(*zip(*points, strict=True), style, color=color, markersize=4, label=label)
    rewards.set_ylabel("reward")
    for key, axis, color in (
        ("rewards/margins", margin, "tab:purple"),
        ("rewards/accuracies", margin.twinx(), "tab:gray"),
    ):
        points = logged_points(history, key)
        if points:
            axis.plot(*zip(*points, strict=True), color=color, label=key.split("/")[1])
            axis.set_ylabel(key.split("/")[1], color=color)
    for axis in (rewards, margin):
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    rewards.legend(loc="best", fontsize=8)
    return _saved(fig, path)


def reward_names(history: list[dict]) -> list[str]:
    """The reward functions a GRPO run logged (rewards/NAME/mean), in their order."""
    names = dict.fromkeys(
        key[len("rewards/") : -len("/mean")]
        for entry in history
        for key in entry
        if key.startswith("rewards/") and key.endswith("/mean")
    )
    return list(names)


def plot_grpo(history: list[dict], path: Path) -> Path:
    """GRPO's curves: each reward's mean and the weighted total; the completions' mean length and
    the share cut at max_completion_length; and the KL to the reference (or, without one, the
    policy's entropy) per step."""
    fig = _figure(14)
    rewards, lengths, divergence = fig.subplots(1, 3)
    for name in reward_names(history):
        points = logged_points(history, f"rewards/{name}/mean")
        rewards.plot(*zip(*points, strict=True), linewidth=1.2, label=name)
    total = logged_points(history, "reward")
    if total:
        rewards.plot(*zip(*total, strict=True), color="black", linewidth=2, label="total (weighted)")
    rewards.set_ylabel("mean reward")
    rewards.legend(loc="best", fontsize=8)
    mean = logged_points(history, "completions/mean_length")
    if mean:
        lengths.plot(*zip(*mean, strict=True), color="tab:blue", label="mean length")
        lengths.set_ylabel("completion tokens", color="tab:blue")
    clipped = logged_points(history, "completions/clipped_ratio")
    if clipped:
        share = lengths.twinx()
        share.plot(*zip(*clipped, strict=True), color="tab:red", label="cut at the limit")
        share.set_ylabel("share cut at max_completion_length", color="tab:red")
    key = "kl" if logged_points(history, "kl") else "entropy"
    points = logged_points(history, key)
    if points:
        divergence.plot(*zip(*points, strict=True), color="tab:purple")
    divergence.set_ylabel("KL to the reference" if key == "kl" else "entropy (no reference)")
    for axis in (rewards, lengths, divergence):
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    return _saved(fig, path)


def plot_lengths(lengths: list[int], max_seq_length: int, path: Path) -> Path:
    """Histogram of token lengths per row, with max_seq_length marked."""
    fig = _figure(8)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="tab:blue")
    ax.axvline(
        max_seq_length, color="tab:red", linestyle="--", linewidth=1, label=f"max_seq_length {max_seq_length}"
    )
    ax.set_xlabel("tokens per row (after the length policy)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(lengths)} rows, longest {max(lengths) if lengths else 0} tokens")
    ax.legend(loc="upper right", fontsize=8)
    return _saved(fig, path)
