"""`runner.py smoke` end to end: every shipped recipe trained on the tiny model, against the bands."""

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune import smoke
from finetune.recipe_files import shipped_recipes

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`runner.py smoke ARGS` as a user runs it on the CPU, with its runs and result under ``tmp_path``."""
    result_file = tmp_path / "result.json"
    out = subprocess.run(
        [
            sys.executable,
            "runner.py",
            "smoke",
            *args,
            "--json",
            str(result_file),
            "--output",
            str(tmp_path / "runs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # The CPU's bands, on any machine: the CUDA bands are written on the first GPU run
        # (`runner.py smoke --update-bands` there), and until then a GPU smoke fails by design.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result_file.is_file(), out.stdout[-3000:] + out.stderr[-2000:]
    return out, json.loads(result_file.read_text())


def test_every_shipped_recipe_passes_its_smoke_bands_on_this_machine(tmp_path):
    out, result = run_smoke(tmp_path)
    assert out.returncode == 0 and result["ok"], out.stdout[-3000:] + out.stderr[-2000:]
    assert [r["recipe"] for r in result["results"]] == [p.stem for p in shipped_recipes()]
    assert result["versions"]["unsloth"] == "2026.10.9" and result["differing_from_pins"] == []
    assert "checks within their bands" in out.stdout and all(c["ok"] for c in result["checks"])
    # Each recipe ran the way `runner.py RECIPE` runs it, so its folder holds what a user's run does.
    for figures in result["results"]:
        files = {p.name for p in Path(figures["run_dir"]).iterdir()}
        expected = {"recipe.yaml", "run.json", "plan.json", "manifest.json", "budget.json", "report.md"}
        assert expected <= files, (figures["recipe"], sorted(files))


def test_a_result_outside_its_band_fails_the_smoke(tmp_path):
    bands = json.loads(smoke.BANDS_FILE.read_text())
    bands["cpu"]["smoke"]["loss"]["12"] *= 1.05  # as if training had changed by 5%
    (tmp_path / "bands.json").write_text(json.dumps(bands))
    out, result = run_smoke(tmp_path, "smoke", "--bands", str(tmp_path / "bands.json"))
    assert out.returncode == 1 and not result["ok"]
    assert [c["name"] for c in result["checks"] if not c["ok"]] == ["loss at step 12"]
    assert "FAIL" in out.stdout and "6 of 7 checks within their bands" in out.stdout
