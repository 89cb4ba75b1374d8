"""benchmarks/gpu_truth.py rehearsed on the CPU, so its first GPU minutes give results: the three
variants run, each result is written the moment it exists, and the time limit stops it cleanly."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_truth.py"


def rehearse(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--rehearse", "--out", str(out), "--lengths", "64"]
    command += ["--batches", "2", "--ranks", "8", "--steps", "4", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_rehearsal_measures_all_three_variants_next_to_their_predictions(tmp_path):
    done = rehearse(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in results] == ["runner", "bare", "transformers"]
    for result in results:
        assert (result["max_seq_length"], result["batch"], result["rank"]) == (64, 2, 8)
        assert len(result["step_seconds"]) == 4 and result["median_step_seconds"] > 0
        assert result["tokens_per_second"] == 128 / result["median_step_seconds"]  # full micro-batches
    runner, bare, transformers = results
    assert "predicted_step_seconds" not in bare  # a bare script has no plan
    for planned in (runner, transformers):
        assert planned["predicted_step_seconds"] > 0 and planned["predicted_tokens_per_micro_batch"] == 128
    assert transformers["predicted_memory_bytes"] != runner["predicted_memory_bytes"]  # its own model
    table = done.stdout.strip().splitlines()[-4:]
    assert table[0].split()[:4] == ["variant", "seq", "mb", "r"]
    assert [line.split()[0] for line in table[1:]] == ["runner", "bare", "transformers"]


def test_a_time_limit_stops_before_a_run_and_still_prints_the_table(tmp_path):
    done = rehearse(tmp_path, "--time-limit", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "time limit: stopped before runner" in done.stdout
    assert not (tmp_path / "results.jsonl").exists()
    assert done.stdout.strip().splitlines()[-1].split()[:4] == ["variant", "seq", "mb", "r"]
