"""benchmarks/gpu_truth.py's plan for a short GPU call: which runs come first, and which are skipped
because the ones before them say they cannot finish (pure functions; the script itself is rehearsed
in tests/e2e/test_gpu_truth_rehearsal.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_truth  # noqa: E402


def test_the_headline_runs_first_for_every_variant_then_the_runners_cheapest_points():
    runs = gpu_truth.matrix([2048, 512, 8192], [1, 4], [16, 64], ["runner", "bare", "transformers"])
    names = [(v, s["max_seq_length"], s["batch"], s["rank"]) for v, s in runs]
    assert names[:3] == [("runner", 2048, 4, 16), ("bare", 2048, 4, 16), ("transformers", 2048, 4, 16)]
    runner_points = [n[1:] for n in names[3:] if n[0] == "runner"]
    assert runner_points == [
        (512, 1, 16),
        (2048, 1, 16),
        (512, 4, 16),
        (2048, 1, 64),
        (8192, 1, 16),
        (2048, 4, 64),
        (8192, 4, 16),
    ]  # fmt: skip  (by tokens per micro-batch, then rank; ties keep the lengths' order)
    assert names[3 : 3 + len(runner_points)] == [("runner", *p) for p in runner_points]  # before the others
    assert len(names) == len(set(names)) == 3 * 8  # every setting of every variant, once


def test_a_run_is_expected_to_take_its_variants_start_up_plus_steps_scaled_by_tokens():
    done = [
        {"variant": "runner", "max_seq_length": 2048, "batch": 4, "seconds": 40.0, "step_seconds": [1.0] * 12,
         "median_step_seconds": 1.0},
    ]  # fmt: skip
    setting = {"max_seq_length": 8192, "batch": 4, "rank": 16}
    # 30 s of start-up with the first two steps (the compiles), then 10 steps at 4x the tokens, with a
    # fifth on top.
    assert gpu_truth.expected_seconds("runner", setting, 12, done) == 30.0 + 1.2 * 10 * 4.0
    # No run of a variant yet: the slowest whole run seen; before any run, 30 s.
    assert gpu_truth.expected_seconds("bare", setting, 12, done) == 40.0
    assert gpu_truth.expected_seconds("bare", setting, 12, []) == 30.0
    failed = [{**done[0], "error": "killed at the time limit"}]
    assert gpu_truth.expected_seconds("runner", setting, 12, failed) == 30.0  # no measurement to go by
