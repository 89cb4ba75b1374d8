"""Kill the smoke run with SIGKILL at random moments of its whole life, recover, and check the result
is exactly the uninterrupted run's.

    python benchmarks/chaos.py --kills 10 --seed 7        # or: make chaos

First an uninterrupted run, with a fresh cache, is watched to learn when each phase of a run's life
happens here: data preparation (the tokenizer and the prepared-data store are built), planning,
model loading (Unsloth imported, the tiny model built and loaded), training, each evaluation (from
an eval step's logged loss to its eval loss), each checkpoint being written (from its folder
appearing to its seal), and the report (after the adapter is saved). Then,
K times: a phase is drawn (in turn, so each is hit), a moment inside its window (seeded), and a new
run with a fresh cache is killed with SIGKILL at that moment. Recovery is what a user does:
`runner.py resume RUN` when the run folder holds a sealed checkpoint, else the same command again.
The recovered run must finish and its adapter must equal the uninterrupted run's, tensor for tensor
(the CPU is deterministic here). After each, what was left behind is listed: temporary folders,
damaged or half-built stores, unsealed checkpoints, run folders that hold no checkpoint.

Prints one line per kill and "K of K kills recovered exactly"; exits 1 otherwise. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEAL = "finetune-seal.json"
# Evaluated every 2 steps on held-out rows, keeping the best checkpoint with early stopping on:
# checkpoints are saved at each evaluation, and a resume must restore the best metric and the
# early-stopping counter to end where the uninterrupted run ends, with its adapter.
RECIPE = [
    "recipes/smoke.yaml",
    "train.max_steps=12",
    "data.eval_fraction=0.25",
    "train.eval_steps=2",
    "train.early_stopping_patience=3",
]
PHASES = (
    "data preparation",
    "planning",
    "model loading",
    "training",
    "evaluation",
    "checkpoint writing",
    "the report",
)


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "FINETUNE_CACHE": str(cache)}


def start(cache: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "runner.py", *RECIPE, f"output.dir={output}"],
        cwd=ROOT,
        env=environment(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_folders(output: Path) -> list[Path]:
    return sorted((output / "smoke").glob("*")) if (output / "smoke").is_dir() else []


def phase_now(cache: Path, output: Path) -> str:
    """Which phase the run is in, from what it has written so far."""
    stores = list((cache / "prepared").glob("*/summary.json")) if (cache / "prepared").is_dir() else []
    folders = run_folders(output)
    if not stores and not folders:
        return "data preparation"
    if not folders:
        return "planning"
    run = folders[-1]
    if (run / "report.md").exists():
        return "finished"
    if (run / "adapter").exists():
        return "the report"
    checkpoints = list((run / "checkpoints").glob("checkpoint-*")) if (run / "checkpoints").is_dir() else []
    if any(not (c / SEAL).exists() for c in checkpoints):
        return "checkpoint writing"
    if not (run / "manifest.json").exists():
        return "model loading"
    return "evaluation" if evaluating(run, checkpoints) else "training"


def evaluating(run: Path, checkpoints: list[Path]) -> bool:
    """An evaluation runs between the log of an eval step's loss and that step's eval loss (the
    log is appended as it happens; the step's checkpoint comes after its evaluation)."""
    logged: dict[int, set[str]] = {}
    for line in (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        logged.setdefault(entry.get("step", 0), set()).update(entry)
    if not logged:
        return False
    step = max(logged)
    every = next((int(o.split("=")[1]) for o in RECIPE if o.startswith("train.eval_steps=")), None)
    if every is None or step % every or "eval_loss" in logged[step]:
        return False
    return f"checkpoint-{step}" not in {c.name for c in checkpoints}


def watch_reference(work: Path) -> tuple[Path, dict[str, list[tuple[float, float]]], float]:
    """The uninterrupted run, and the windows (seconds from its start) each phase took."""
    cache, output = work / "reference-cache", work / "reference"
    process = start(cache, output)
    began, windows, current, since = time.monotonic(), {p: [] for p in PHASES}, None, 0.0
    while process.poll() is None:
        now, phase = time.monotonic() - began, phase_now(cache, output)
        if phase != current:
            if current in windows:
                windows[current].append((since, now))
            current, since = phase, now
        time.sleep(0.005)
    total = time.monotonic() - began
    if current in windows:
        windows[current].append((since, total))
    if process.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{process.stderr.read()[-3000:]}")
    return run_folders(output)[-1], windows, total


def draw_moments(
    windows: dict, kills: int, rng: random.Random, phases: tuple[str, ...] = PHASES
) -> list[tuple[str, int, float]]:
    """``kills`` moments: the ``phases`` in turn (those the reference run went through), then which
    time the run enters that phase (checkpoints are written several times) and how far into it,
    drawn with ``rng`` from the reference run's windows."""
    seen = [p for p in phases if windows[p]]
    moments = []
    for k in range(kills):
        phase = seen[k % len(seen)]
        entry = rng.randrange(len(windows[phase]))
        start_s, end_s = windows[phase][entry]
        # Into its first 60%: a run slower or faster than the reference one is still inside.
        moments.append((phase, entry, rng.uniform(0, 0.6 * (end_s - start_s))))
    return moments


def kill_at(process, cache: Path, output: Path, phase: str, entry: int, delay: float) -> tuple[str, float]:
    """SIGKILL ``delay`` seconds after the run enters ``phase`` for the ``entry``-th time (from 0),
    as the reference run's timing said; returns the phase it was in when killed, and when."""
    began, entries, current, entered = time.monotonic(), -1, None, None
    while process.poll() is None:
        now = phase_now(cache, output)
        if now != current:
            current = now
            if now == phase:
                entries += 1
                entered = time.monotonic() if entries == entry else entered
        if entered is not None and time.monotonic() - entered >= delay:
            break
        time.sleep(0.002)
    hit, moment = phase_now(cache, output), time.monotonic() - began
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return hit, moment


def recover(cache: Path, output: Path) -> tuple[str, subprocess.CompletedProcess]:
    """What a user does after the kill: `resume` the run folder when one was started (from its
    latest sound checkpoint, or from the first step when it has none), else the same command."""
    env = environment(cache)
    started = [r for r in run_folders(output) if (r / "recipe.yaml").is_file() and (r / "run.json").is_file()]
    if started:
        command, how = ["resume", str(started[-1])], f"resume {started[-1].name}"
    else:
        command, how = [*RECIPE, f"output.dir={output}"], "rerun"
    done = subprocess.run(
        [sys.executable, "runner.py", *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return how, done


def same_adapter(a: Path, b: Path) -> str | None:
    """None when the two adapters hold equal tensors, else what differs."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if left.keys() != right.keys():
        return "different tensors"
    unequal = [name for name in left if not torch.equal(left[name], right[name])]
    return f"{len(unequal)} of {len(left)} tensors differ" if unequal else None


def left_behind(cache: Path, output: Path) -> list[str]:
    """Debris after recovery: what a run killed at that moment left that nothing cleaned up."""
    found = []
    for path in [*cache.rglob(".*tmp*"), *cache.rglob(".*damaged*"), *cache.glob("*.tmp*")]:
        found.append(f"temporary {path.relative_to(cache)}")
    prepared = cache / "prepared"
    if prepared.is_dir():
        found += [
            f"half-built store {d.name}"
            for d in prepared.iterdir()
            if d.is_dir() and not d.name.startswith(".") and not (d / "summary.json").exists()
        ]
    for run in run_folders(output):
        for checkpoint in (run / "checkpoints").glob("checkpoint-*"):
            if not (checkpoint / SEAL).exists():
                found.append(f"unsealed {run.name}/checkpoints/{checkpoint.name}")
        if not (run / "report.md").exists():
            found.append(f"unfinished run folder {run.name}")
        found += [f"temporary {p.relative_to(output)}" for p in run.rglob("*.tmp*")]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"the phases to kill in, in turn (default: {', '.join(PHASES)})",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    reference, windows, total = watch_reference(work)
    spans = ", ".join(f"{p} {sum(e - s for s, e in windows[p]):.1f} s" for p in PHASES if windows[p])
    print(
        f"seed {args.seed}, {args.kills} kills; the uninterrupted run took {total:.1f} s ({spans})",
        flush=True,
    )
    results = []
    phases = tuple(name.strip() for name in args.phases.split(","))
    if unknown := [name for name in phases if name not in PHASES]:
        parser.error(f"unknown phase {unknown[0]!r}; the phases are {', '.join(PHASES)}")
    for k, (phase, entry, delay) in enumerate(draw_moments(windows, args.kills, rng, phases), 1):
        cache, output = work / f"kill-{k}-cache", work / f"kill-{k}"
        hit, moment = kill_at(start(cache, output), cache, output, phase, entry, delay)
        aim = f"{phase}{f' #{entry + 1}' if len(windows[phase]) > 1 else ''} + {delay:.2f} s"
        how, done = recover(cache, output)
        finished = [r for r in run_folders(output) if (r / "report.md").exists()]
        problem = None
        if done.returncode != 0:
            problem = f"recovery failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        elif not finished:
            problem = "no run finished"
        else:
            problem = same_adapter(finished[-1] / "adapter", reference / "adapter")
        debris = left_behind(cache, output)
        results.append(
            {
                "kill": k,
                "aimed_at": aim,
                "seconds": round(moment, 2),
                "killed_during": hit,
                "recovery": how,
                "exact": problem is None,
                "problem": problem,
                "left_behind": debris,
            }
        )
        verdict = "recovered exactly" if problem is None else f"NOT RECOVERED: {problem}"
        print(f"kill {k}: at {moment:.2f} s, during {hit} (aimed at {aim}); {how}: {verdict}", flush=True)
        for item in debris:
            print(f"  left behind: {item}", flush=True)
        if problem is None:
            shutil.rmtree(cache, ignore_errors=True)
    exact = sum(r["exact"] for r in results)
    print(f"{exact} of {len(results)} kills recovered exactly (seed {args.seed})")
    debris = sum(len(r["left_behind"]) for r in results)
    print(f"left behind: {debris} item{'s' if debris != 1 else ''} in all" + ("" if debris else " (nothing)"))
    if args.json:
        # What docs/runs.md quotes (benchmarks/docs_figures.py chaos_lines): when and where it ran.
        document = {
            "seed": args.seed,
            "date": time.strftime("%Y-%m-%d"),
            "cpu_count": os.cpu_count(),
            "seconds": round(time.monotonic() - began),
            "windows": windows,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if exact == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
