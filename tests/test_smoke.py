"""The nightly smoke: every shipped recipe on the tiny model against its stored bands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import smoke
from finetune.recipe import shipped_recipes

ROOT = Path(__file__).resolve().parent.parent


def figures(**changes):
    base = {
        "recipe": "smoke",
        "kind": "cpu",
        "loss": {"1": 12.0, "12": 10.0},
        "trainable_parameters": 45056,
        "reloaded_loss": 10.2,
        "reloaded_answer": "def f",
    }
    return {**base, **changes}


BANDS = {
    "cpu": {"smoke": {"loss": {"1": 12.0, "12": 10.0}, "trainable_parameters": 45056, "reloaded_loss": 10.2}}
}


def test_a_figure_outside_its_band_fails_and_a_missing_band_is_a_failure():
    assert all(c.ok for c in smoke.check(figures(loss={"1": 12.05, "12": 9.95}), BANDS))  # within 1%
    failed = [c.name for c in smoke.check(figures(loss={"1": 12.0, "12": 10.2}), BANDS) if not c.ok]
    assert failed == ["loss at step 12"]
    failed = [
        c.name for c in smoke.check(figures(loss={"1": 12.0}, trainable_parameters=1), BANDS) if not c.ok
    ]
    assert failed == ["loss at step 12", "trainable parameters"]
    assert not smoke.check(figures(reloaded_loss=12.0), BANDS)[-2].ok  # the save was lost
    assert not smoke.check(figures(reloaded_answer=" "), BANDS)[-1].ok
    (broken,) = smoke.check(
        {"recipe": "smoke", "kind": "cpu", "error": "NotImplementedError: You need a GPU."}, BANDS
    )
    assert not broken.ok and broken.name == "trains" and broken.got == "NotImplementedError: You need a GPU."
    (missing,) = smoke.check(figures(kind="cuda"), BANDS)
    assert not missing.ok and "--update-bands" in missing.got
    on_gpu = figures(
        kind="cuda",
        memory={"predicted": 1.2e9, "measured": 1.0e9},
        step_seconds={"predicted": 1.0, "measured": 1.1},
    )
    checks = {c.name: c for c in smoke.check(on_gpu, {"cuda": BANDS["cpu"]})}
    assert not checks["memory predicted vs measured"].ok and checks["step_seconds predicted vs measured"].ok


def test_new_bands_show_every_difference():
    updated, changes = smoke.new_bands([figures(loss={"1": 12.0, "12": 9.0})], BANDS)
    assert changes == ["cpu smoke loss at step 12: 10.0 -> 9.0"]
    assert updated["cpu"]["smoke"]["loss"]["12"] == 9.0 and BANDS["cpu"]["smoke"]["loss"]["12"] == 10.0
    assert smoke.drift({"trl": "9.9.9", "torch": smoke.pins()["torch"]}) == [
        f"trl {smoke.pins()['trl']} -> 9.9.9"
    ]


def run_smoke(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`runner.py smoke ARGS` as a user runs it, with its runs and result under ``tmp_path``."""
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
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result_file.is_file(), out.stdout[-3000:] + out.stderr[-2000:]
    return out, json.loads(result_file.read_text())


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_result_outside_its_band_fails_the_smoke(tmp_path):
    bands = json.loads(smoke.BANDS_FILE.read_text())
    bands["cpu"]["smoke"]["loss"]["12"] *= 1.05  # as if training had changed by 5%
    (tmp_path / "bands.json").write_text(json.dumps(bands))
    out, result = run_smoke(tmp_path, "smoke", "--bands", str(tmp_path / "bands.json"))
    assert out.returncode == 1 and not result["ok"]
    assert [c["name"] for c in result["checks"] if not c["ok"]] == ["loss at step 12"]
    assert "FAIL" in out.stdout and "6 of 7 checks within their bands" in out.stdout
