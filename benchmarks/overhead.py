"""Our runner against a bare Unsloth + TRL script with the smoke recipe's settings, side by side on
this machine: the same tiny model, data, LoRA, optimizer, schedule and checkpoints (every 3 steps,
2 kept), runs alternating so both see the same machine, medians and ratios printed for the training
loop (trainer.train()) and for the whole process (start to exit). What the runner does outside the
loop and the bare script does not: plan the data, schedule, memory and disk, the run folder and its
manifest, the samples before and after training, the report and its plots.

    .venv/bin/python benchmarks/overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_runner(out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "runner.py", "recipes/smoke.yaml", f"output.dir={out}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    loop = float(re.search(r"^Done: \d+ steps in ([\d.]+) s", done.stdout, re.M).group(1))
    return loop, whole


def run_bare(out: Path, model: Path) -> tuple[float, float]:
    command = [sys.executable, str(ROOT / "benchmarks" / "bare_unsloth.py"), "--model", str(model)]
    command += ["--data", "data_samples/code_chat.jsonl", "--max-seq-length", "1024", "--batch", "2"]
    command += ["--accumulation", "2", "--rank", "8", "--alpha", "16", "--steps", "30"]
    command += ["--learning-rate", "1e-2", "--warmup-steps", "3", "--save-steps", "3", "--seed", "0"]
    command += ["--output", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    whole = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["loop_seconds"], whole


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from finetune.models.tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    times = {"runner": [], "bare": []}
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(args.repeats):
            for name in ("runner", "bare") if k % 2 == 0 else ("bare", "runner"):
                out = Path(scratch) / f"{name}-{k}"
                measured = run_runner(out) if name == "runner" else run_bare(out, model)
                times[name].append(measured)
                print(f"{name}: loop {measured[0]:.1f} s, whole process {measured[1]:.1f} s", flush=True)
    for label, index in (("training loop", 0), ("whole process", 1)):
        ours = statistics.median(t[index] for t in times["runner"])
        bare = statistics.median(t[index] for t in times["bare"])
        print(
            f"{label}: runner {ours:.1f} s, bare {bare:.1f} s, ratio {ours / bare:.2f}x "
            f"(median of {args.repeats})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
