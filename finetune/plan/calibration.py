"""Predictions held to measurements: what "measured peak memory" means, a probe's measurement
against the budget, and the predicted-against-measured record every run saves (budget.json) for
`runner.py calibration`. Pure Python, like budget.py, whose constants these comparisons will fit."""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING

from finetune.plan.budget import BudgetPlan, Verdict, budget_as_dict
from finetune.plan.constants import GIB, constant
from finetune.recipe.schema import Recipe

if TYPE_CHECKING:  # the plan holds the budget this holds a measurement to
    from finetune.plan.job import Job


def measured_peak_bytes(peak_reserved: float | None) -> float | None:
    """What "measured peak memory" means everywhere (the probe, the smoke bands, budget.json,
    calibration, the out-of-memory report): the same quantity the plan's total predicts, so the two
    can be compared. The most PyTorch's caching allocator held (torch.cuda.max_memory_reserved: the
    tensors plus its fragmentation, our "allocator overhead") plus the CUDA context, which no
    allocator counter sees, at its planned size. None where nothing was measured (the CPU)."""
    return None if peak_reserved is None else peak_reserved + constant("cuda_context_bytes")


class BudgetExceeded(Exception):
    """A measurement (the probe) broke a limit; the message says which, and by how much."""


def measured_verdicts(
    recipe: Recipe,
    plan: BudgetPlan,
    step_seconds: float | None,
    peak_reserved: float | None,
    total_steps: int,
) -> list[Verdict]:
    """The budget's limits against what a probe measured (see measured_peak_bytes)."""
    verdicts = []
    if peak_reserved is not None:
        used = measured_peak_bytes(peak_reserved) / GIB
        verdicts.append(
            Verdict(f"measured memory on {plan.device.name}", used, plan.device.memory_bytes / GIB, "GiB")
        )
        if recipe.budget.max_memory_gib is not None:
            verdicts.append(Verdict("measured memory (budget)", used, recipe.budget.max_memory_gib, "GiB"))
    if step_seconds is not None:
        if recipe.budget.max_step_seconds is not None:
            verdicts.append(
                Verdict("measured seconds per step", step_seconds, recipe.budget.max_step_seconds, "s")
            )
        if recipe.budget.max_hours is not None:
            hours = step_seconds * total_steps / 3600
            verdicts.append(Verdict("measured total hours", hours, recipe.budget.max_hours, "h"))
    return verdicts


def calibration_record(plan: BudgetPlan, measured: dict, model: str, recipe_name: str) -> dict:
    """Predicted next to measured, as every run saves it (budget.json) for `runner.py calibration`."""
    step = measured.get("median_step_seconds")
    peak = measured_peak_bytes(measured.get("peak_reserved_bytes"))
    record = {
        "recipe": recipe_name,
        "model": model,
        "device": plan.device.name,
        "tokens_per_micro_batch": plan.memory.tokens_per_micro_batch,
        "predicted": budget_as_dict(plan),
        "measured": measured,
        "measured_peak_bytes": peak,
        "measured_peak_is": "torch.cuda.max_memory_reserved() + the planned CUDA context",
        "step_error": None if not step or not plan.time_predicted else plan.time.step_seconds / step - 1,
        "memory_error": None
        if peak is None or not plan.device.is_gpu
        else (plan.memory.total - plan.memory.paged) / peak - 1,
    }
    return record


def calibration_table(records: list[dict]) -> list[str]:
    """One line per run: predicted and measured step time and memory, with the relative errors."""
    lines = [
        f"{'recipe':<14} {'device':<12} {'tokens/mb':>9} {'step pred':>10} {'step meas':>10} {'err':>7}"
        f" {'mem pred':>9} {'mem meas':>9} {'err':>7}"
    ]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.0%}"

    for r in records:
        measured = r["measured"]
        peak = measured_peak_bytes(measured.get("peak_reserved_bytes"))
        memory = "-" if peak is None else f"{peak / GIB:.2f}"
        step = measured.get("median_step_seconds")
        # A CPU's step time is not predicted (BudgetPlan.time_predicted); older records say CPU.
        if r["predicted"].get("time_predicted", r["device"] != "CPU"):
            predicted, error = f"{r['predicted']['step_seconds']:.3f}", r["step_error"]
        else:
            predicted, error = "-", None
        lines.append(
            f"{r['recipe']:<14} {r['device']:<12} {r['tokens_per_micro_batch']:>9}"
            f" {predicted:>10} {'-' if step is None else f'{step:.3f}':>10}"
            f" {pct(error):>7} {r['predicted']['memory_total_bytes'] / GIB:>9.2f} {memory:>9}"
            f" {pct(r['memory_error']):>7}"
        )
    for key, label in (("step_error", "step time"), ("memory_error", "peak memory")):
        errors = [
            abs(r[key])
            for r in records
            if r[key] is not None
            and (key != "step_error" or r["predicted"].get("time_predicted", r["device"] != "CPU"))
        ]
        if errors:
            lines.append(f"{label}: mean |error| {sum(errors) / len(errors):.0%} over {len(errors)} runs")
    return lines


# ---- Constants fitted from benchmarks/gpu_truth.py results ----------------------------------------


def fit_constants(results: list[dict], constants_used: dict[str, float], where: str) -> dict[str, tuple]:
    """The time and memory constants that the measured runs imply, each as (value, source).

    Step time per micro-batch is matmuls / gemm_efficiency plus two costs that are the same for
    every micro-batch: 4-bit dequantization and the fixed overhead. Runs that differ in length and
    micro-batch size tell the first apart (a least-squares line in the matmuls' FLOP time) but not
    the other two from each other: bandwidth_efficiency is kept and micro_batch_overhead_s is what
    remains. allocator_overhead is reserved over allocated memory; transformers_slowdown the
    transformers backend's step time over Unsloth's at the same setting. Only runner results with
    a GPU's measurements count."""

    runner = [r for r in results if r.get("variant") == "runner" and "error" not in r and r.get("predicted")]
    runner = [r for r in runner if r.get("peak_reserved_bytes")]
    fitted: dict[str, tuple] = {}
    if len(runner) >= 2:
        flop_time, per_micro_batch = [], []
        for r in runner:
            causes = r["predicted"]["step_seconds_by_cause"]
            flop_time.append(causes["matmuls"] * constants_used["gemm_efficiency"])
            per_micro_batch.append(r["median_step_seconds"] / r["gradient_accumulation_steps"])
        slope, intercept = statistics.linear_regression(flop_time, per_micro_batch)
        dequant = statistics.mean(
            r["predicted"]["step_seconds_by_cause"]["4-bit dequantization"] for r in runner
        )
        source = f"fitted: {len(runner)} runs, {where}"
        fitted["gemm_efficiency"] = (1 / slope, source)
        fitted["micro_batch_overhead_s"] = (intercept - dequant, source)
        ratios = [r["peak_reserved_bytes"] / r["peak_allocated_bytes"] - 1 for r in runner]
        fitted["allocator_overhead"] = (statistics.median(ratios), source)
    by_setting = {(r["max_seq_length"], r["batch"], r["rank"]): r for r in runner}
    slower = [
        r["median_step_seconds"] / by_setting[key]["median_step_seconds"]
        for r in results
        if r.get("variant") == "transformers"
        and "error" not in r
        and r.get("peak_reserved_bytes")
        and (key := (r["max_seq_length"], r["batch"], r["rank"])) in by_setting
    ]
    if slower:
        fitted["transformers_slowdown"] = (statistics.median(slower), f"fitted: {len(slower)} pairs, {where}")
    return fitted


def probe_verdict(job: Job, measured, force: bool) -> list[str]:
    """The probe's measurement held to the budget: the lines to print; raises BudgetExceeded when it
    breaks the budget, unless ``force``."""
    peak = measured.peak_reserved
    lines = [
        f"probe: {len(measured.step_seconds)} steps on the worst-case micro-batch, "
        f"{measured.median_step_seconds:.2f} s per step"
        + (f", peak memory {measured_peak_bytes(peak) / GIB:.2f} GiB" if peak is not None else "")
    ]
    if measured.eval_tokens is not None:
        eval_peak = measured.eval_peak_reserved
        lines.append(
            f"probe: an eval batch of {measured.eval_tokens} tokens (the longest eval rows)"
            + (
                f", peak memory {measured_peak_bytes(eval_peak) / GIB:.2f} GiB"
                if eval_peak is not None
                else ""
            )
        )
    if job.budget is None:
        return lines
    verdicts = measured_verdicts(
        job.recipe, job.budget, measured.median_step_seconds, peak, job.plan.total_steps
    )
    if measured.eval_peak_reserved is not None:
        verdicts += [
            replace(v, what=v.what.replace("measured memory", "measured memory of an evaluation"))
            for v in measured_verdicts(job.recipe, job.budget, None, measured.eval_peak_reserved, 0)
        ]
    lines += [verdict.line() for verdict in verdicts]
    failed = [v.line() for v in verdicts if not v.ok]
    if failed and not force:
        raise BudgetExceeded("; ".join(failed))
    if failed:
        lines.append("warning: --force: training although the probe broke the budget")
    return lines
