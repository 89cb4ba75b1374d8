"""Constants fitted from benchmark results (benchmarks/fit_constants.py): on a synthetic results
file made with known constants, the fit recovers them, writes them where budget.py reads them, and
generates docs/benchmarks.md from the same file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.models.shapes import Shapes, shipped_config
from finetune.plan import budget, constants
from finetune.plan.budget import budget_as_dict, plan_budget
from finetune.plan.devices import GPUS
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TRUE = {"gemm_efficiency": 0.31, "micro_batch_overhead_s": 0.012, "allocator": 0.07, "slowdown": 1.8}


def synthetic_results(folder: Path) -> None:
    """gpu_truth.py's files, as an H100 would have measured them if the constants were TRUE."""
    shapes = Shapes.from_config(shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"))
    used = {name: value for name, (value, _) in constants.CONSTANTS.items()}
    rows = []
    for length in (512, 2048, 8192):
        for batch in (1, 4):
            recipe = load_recipe(
                ROOT / "recipes" / "code-gen.yaml",
                [
                    f"model.max_seq_length={length}",
                    f"train.per_device_train_batch_size={batch}",
                    "train.gradient_accumulation_steps=1",
                ],
            )
            work = budget.Workload([length] * 64, 64, False, 10)
            predicted = budget_as_dict(plan_budget(recipe, shapes, GPUS["h100"], work))
            causes = predicted["step_seconds_by_cause"]
            flop_time = causes["matmuls"] * used["gemm_efficiency"]
            step = flop_time / TRUE["gemm_efficiency"] + causes["4-bit dequantization"]
            step += TRUE["micro_batch_overhead_s"]
            allocated = 0.9 * predicted["memory_total_bytes"]
            common = {"max_seq_length": length, "batch": batch, "rank": 16, "tokens_per_second": 1.0}
            rows.append(
                {
                    **common,
                    "variant": "runner",
                    "median_step_seconds": step,
                    "gradient_accumulation_steps": 1,
                    "peak_allocated_bytes": allocated,
                    "peak_reserved_bytes": allocated * (1 + TRUE["allocator"]),
                    "predicted_step_seconds": predicted["step_seconds"],
                    "predicted": predicted,
                    "predicted_memory_bytes": predicted["memory_total_bytes"],
                }
            )
            rows.append(
                {
                    **common,
                    "variant": "transformers",
                    "median_step_seconds": step * TRUE["slowdown"],
                    "peak_allocated_bytes": allocated,
                    "peak_reserved_bytes": allocated,
                }
            )
    rows.append({"max_seq_length": 8192, "batch": 8, "rank": 16, "variant": "bare", "error": "out of memory"})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    setup = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "versions": {"torch": "2.14.1"},
        "command": "gpu_truth.py",
        "constants": used,
    }
    (folder / "environment.json").write_text(json.dumps(setup))


def test_the_fit_recovers_known_constants_and_budget_uses_them(tmp_path, monkeypatch):
    synthetic_results(tmp_path)
    constants_file, docs = tmp_path / "fitted.json", tmp_path / "benchmarks.md"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/fit_constants.py",
            str(tmp_path),
            "--write",
            "--constants-file",
            str(constants_file),
            "--docs",
            str(docs),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    fitted = json.loads(constants_file.read_text())
    assert fitted["gemm_efficiency"]["value"] == pytest.approx(TRUE["gemm_efficiency"], rel=1e-9)
    assert fitted["micro_batch_overhead_s"]["value"] == pytest.approx(
        TRUE["micro_batch_overhead_s"], rel=1e-6
    )
    assert fitted["allocator_overhead"]["value"] == pytest.approx(TRUE["allocator"], rel=1e-9)
    assert fitted["transformers_slowdown"]["value"] == pytest.approx(TRUE["slowdown"], rel=1e-9)
    assert fitted["gemm_efficiency"]["source"].startswith("fitted: 6 runs, NVIDIA H100 80GB HBM3")
    text = docs.read_text()
    assert "- GPU: NVIDIA H100 80GB HBM3" in text and "| bare | 8192 | 8 | 16 | error |  |" in text
    assert "| `gemm_efficiency` | 0.45 | 0.31 |" in text

    monkeypatch.setattr(constants, "CONSTANTS", dict(constants.CONSTANTS))
    monkeypatch.setattr(constants, "FITTED", constants.load_fitted(constants_file))
    assert constants.constant("gemm_efficiency") == pytest.approx(TRUE["gemm_efficiency"])
    shapes = Shapes.from_config(shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"))
    plan = plan_budget(
        load_recipe(ROOT / "recipes" / "code-gen.yaml"),
        shapes,
        GPUS["h100"],
        budget.Workload([2048] * 64, 64, False, 10),
    )
    assert "  (speed and allocator constants fitted: 6 runs, NVIDIA H100" in "\n".join(
        budget.describe_budget(plan)
    )


def test_results_without_gpu_measurements_fit_nothing(tmp_path):
    (tmp_path / "results.jsonl").write_text(
        json.dumps(
            {
                "variant": "runner",
                "max_seq_length": 64,
                "batch": 2,
                "rank": 8,
                "median_step_seconds": 0.5,
                "peak_allocated_bytes": None,
                "peak_reserved_bytes": None,
                "predicted": {},
            }
        )
        + "\n"
    )
    (tmp_path / "environment.json").write_text(
        json.dumps({"gpu": "CPU", "versions": {}, "command": "x", "constants": {}})
    )
    done = subprocess.run(
        [sys.executable, "benchmarks/fit_constants.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "nothing to fit: no runner result with GPU measurements" in done.stdout
