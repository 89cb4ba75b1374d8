"""The GPU command rehearsed on the CPU, so its first GPU minutes give results.

The first test runs benchmarks/rehearse_gpu.sh: benchmarks/gpu_first_command.sh as the GPU machine
will run it (python3 of a reproduction of its image, torch 2.11 and no package of ours but the site
tarball, in a copy of what the device tool sends, with the network off), on the tiny model. The
second holds gpu_truth.py's deadline: a run still going when it passes is killed with every process
it started, and the table is still printed.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_truth.py"


def processes_naming(text: str) -> list[str]:
    """The command lines of the live processes that contain ``text`` (read whole, from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in args:
            found.append(args)
    return found


MODEL = "tiny-llama-3-shaped-bnb-4bit"  # gpu_truth.py's model folder in --out, when rehearsing


@pytest.fixture(scope="module")
def built_model(tmp_path_factory) -> Path:
    """The pre-quantized model gpu_truth.py builds first, built once ahead for the deadline tests,
    so its time counts in neither deadline."""
    out = tmp_path_factory.mktemp("model")
    command = [sys.executable, str(SCRIPT), "--rehearse", "--out", str(out), "--build-model"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert (out / MODEL / "config.json").is_file()
    return out / MODEL


def build_the_model(out: Path, built: Path) -> None:
    """The built model, where gpu_truth.py --out OUT finds it (and so does not build it again)."""
    shutil.copytree(built, out / MODEL)


def test_the_gpu_command_runs_in_the_reproduced_image_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "BUDGET": "900",  # the CPU is slower than the GPU's 270 s; the deadline itself is tested below
        "MATRIX_ARGS": "--lengths 64 --batches 2 --ranks 8 --steps 4",
    }
    done = subprocess.run(
        ["bash", "benchmarks/rehearse_gpu.sh", "matrix", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a fresh clone builds the image's environment first (about 3 minutes)
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    imports = json.loads((out / "imports.json").read_text())
    # The image's Python and torch, not ours; our pins of what it lacks, from the tarball.
    assert imports["python"].startswith("3.12.") and "/.venv-gpu-image/" in imports["executable"]
    versions = {name: result.get("version") for name, result in imports["imports"].items()}
    assert versions["torch"].startswith("2.11.0") and versions["finetune.train.stack"] == "2026.10.9"
    assert (versions["trl"], versions["peft"], versions["bitsandbytes"]) == ("1.15.0", "0.21.2", "0.50.2")
    assert (
        imports["failed"] == [] and next(iter(imports["imports"])) == "finetune.train.stack"
    )  # Unsloth first
    assert all(result["ok"] for name, result in imports["imports"].items() if name.startswith("finetune."))
    assert imports["imports"]["unsloth's GPU import path"]["ok"]  # its CUDA path, under torch 2.11
    for theirs in ("rich", "psutil", "tensorboard", "tiktoken", "yaml"):  # the image's own copies
        assert "/.venv-gpu-image/" in imports["imports"][theirs]["file"], theirs
    progress = (out / "progress.txt").read_text()
    assert "peft: the image has absent, our pin is 0.21.2: using ours" in progress
    assert "matrix: exit 0" in progress
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in results] == ["runner", "bare", "transformers"]
    for result in results:
        assert "error" not in result, result["error"]
        assert (result["max_seq_length"], result["batch"], result["rank"]) == (64, 2, 8)
        assert len(result["step_seconds"]) == 4 and result["median_step_seconds"] > 0
        assert result["tokens_per_second"] == 128 / result["median_step_seconds"]  # full micro-batches
    runner, bare, transformers = results
    assert "predicted_step_seconds" not in bare  # a bare script has no plan
    assert runner["padding_free"] is False and transformers["padding_free"] is False  # ours, always
    # Unsloth's allocator setting, seen by the runner and the bare script alike; never by the
    # transformers backend, which does not import Unsloth.
    assert runner["alloc_conf"] == bare["alloc_conf"] and transformers["alloc_conf"] is None
    for planned in (runner, transformers):
        assert planned["predicted_step_seconds"] > 0 and planned["predicted_tokens_per_micro_batch"] == 128
    assert transformers["predicted_memory_bytes"] != runner["predicted_memory_bytes"]  # its own model
    logs = (out / "run_logs.txt").read_text()
    for name in ("runner", "bare", "transformers"):
        assert f"===== {name}-64-2-r8 (exit 0) =====" in logs
    table = (out / "table.txt").read_text().splitlines()
    assert table[0].split()[:4] == ["variant", "seq", "mb", "r"]
    assert [line.split()[0] for line in table[1:]] == ["runner", "bare", "transformers"]
    assert "\n".join(table) in done.stdout  # printed last, as the device tool's reply will show it
    # What comes back fits the device tool: at most 8 files, flat, small (the model, data and run
    # folders were written elsewhere).
    files = sorted(path.name for path in out.iterdir())
    assert all(path.is_file() for path in out.iterdir()) and len(files) <= 8, files
    assert files == sorted(
        ["progress.txt", "imports.json", "environment.json", "results.jsonl", "table.txt"]
        + ["run_logs.txt", "gpu_truth.log"]
    )
    assert sum(path.stat().st_size for path in out.iterdir()) < 2 * 2**20
    assert "processes left on the GPU: none" in progress
    # What comes back is what the calibration reads (on the CPU there is nothing to fit).
    fit = subprocess.run(
        [sys.executable, "benchmarks/fit_constants.py", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert fit.returncode == 0 and "no runner result with GPU measurements" in fit.stdout, fit.stderr


def test_a_run_past_the_deadline_is_killed_with_its_processes_and_the_table_printed(tmp_path, built_model):
    """Time limit 40 s: the first run starts (about 30 s expected before any has run) and, with 4000
    steps, cannot finish (400 did, in 39.5 s, on a CPU with AMX); it is killed at the deadline, not
    waited for."""
    build_the_model(tmp_path, built_model)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rehearse", "--out", str(tmp_path), "--lengths", "64"]
        + ["--batches", "2", "--ranks", "8", "--steps", "4000", "--variants", "runner", "bare"]
        + ["--time-limit", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert result["variant"] == "runner" and "killed at the time limit" in result["error"]
    assert "time limit: skipped bare" in done.stdout  # nothing starts after the deadline
    assert took < 40 + 25, took  # the kill came at the deadline (start-up of this script on top)
    # No process of the killed run lives on (its run folder appears in none's command line).
    assert processes_naming(str(tmp_path / "runs")) == []
    assert done.stdout.strip().splitlines()[-2].split()[:4] == ["variant", "seq", "mb", "r"]
    assert "error: " in done.stdout.strip().splitlines()[-1]


def test_the_run_in_progress_dies_with_the_script_though_it_has_a_session_of_its_own(tmp_path, built_model):
    """The command's `timeout` sends SIGTERM to gpu_truth.py's process group; each run has a session
    of its own (so the deadline can kill all it started), which that signal does not reach, and the
    device tool leaves such processes running on the GPU. They must go with the script."""
    build_the_model(tmp_path, built_model)
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--rehearse", "--out", str(tmp_path), "--lengths", "64"]
        + ["--batches", "2", "--ranks", "8", "--steps", "400", "--variants", "runner"]
        + ["--time-limit", "600"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def run_processes() -> list[str]:
        return processes_naming(str(tmp_path / "runs"))

    deadline = time.monotonic() + 240
    while not run_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes(), "the run never started"
    script.terminate()
    assert script.wait(timeout=30) == 128 + 15
    time.sleep(2)
    assert run_processes() == []
