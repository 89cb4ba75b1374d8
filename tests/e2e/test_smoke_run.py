"""`runner.py smoke` end to end: every shipped recipe trained on the tiny model, against the bands."""

import json
import subprocess
from pathlib import Path

import pytest
from cli_helpers import runner

from finetune.cli import smoke
from finetune.recipe.documents import shipped_recipes

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(tmp_path: Path, *args: str, **how) -> tuple[subprocess.CompletedProcess, dict]:
    """`runner.py smoke ARGS` as a user runs it on the CPU, with its runs and result under ``tmp_path``
    (``how``: cli_helpers.runner's preamble and env_extra)."""
    result_file = tmp_path / "result.json"
    # The CPU's bands, on any machine: the CUDA bands are written on the first GPU run
    # (`runner.py smoke --update-bands` there), and until then a GPU smoke fails by design.
    out = runner(
        "smoke",
        *args,
        "--json",
        str(result_file),
        "--output",
        str(tmp_path / "runs"),
        hide_gpu=True,
        timeout=3600,
        **how,
    )
    assert result_file.is_file(), out.stdout[-3000:] + out.stderr[-2000:]
    return out, json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def smoke_of_every_recipe(tmp_path_factory):
    """`runner.py smoke`: every shipped recipe trained once, for the tests below."""
    folder = tmp_path_factory.mktemp("smoke")
    out, result = run_smoke(folder)
    return out, result, folder


def test_every_shipped_recipe_passes_its_smoke_bands_on_this_machine(smoke_of_every_recipe):
    out, result, _ = smoke_of_every_recipe
    assert out.returncode == 0 and result["ok"], out.stdout[-3000:] + out.stderr[-2000:]
    assert [r["recipe"] for r in result["results"]] == [p.stem for p in shipped_recipes()]
    assert result["versions"]["unsloth"] == "2026.10.9" and result["differing_from_pins"] == []
    assert "checks within their bands" in out.stdout and all(c["ok"] for c in result["checks"])
    # Each recipe ran the way `runner.py RECIPE` runs it, so its folder holds what a user's run does.
    for figures in result["results"]:
        files = {p.name for p in Path(figures["run_dir"]).iterdir()}
        expected = {"recipe.yaml", "run.json", "plan.json", "manifest.json", "budget.json", "report.md"}
        assert expected <= files, (figures["recipe"], sorted(files))


# `runner.py smoke` whose training of each recipe gives the figures in SMOKE_FIGURES (a JSON file of
# the figures by recipe) instead of training again: the smoke recipe was trained, with the same
# seed, by the smoke of every recipe above; what is checked here is the verdict on its figures.
FIGURES_OF_THE_SHARED_SMOKE = """
import json, os
from finetune.cli import smoke
_figures = json.loads(open(os.environ["SMOKE_FIGURES"]).read())
smoke.smoke_recipe_or_failure = lambda recipe_path, output_dir: _figures[recipe_path.stem]
"""


def test_a_result_outside_its_band_fails_the_smoke(smoke_of_every_recipe, tmp_path):
    _, shared, _ = smoke_of_every_recipe
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({r["recipe"]: r for r in shared["results"]}))
    bands = json.loads(smoke.BANDS_FILE.read_text())
    bands["cpu"]["smoke"]["loss"]["12"] *= 1.05  # as if training had changed by 5%
    (tmp_path / "bands.json").write_text(json.dumps(bands))
    out, result = run_smoke(
        tmp_path, "smoke", "--bands", str(tmp_path / "bands.json"),
        preamble=FIGURES_OF_THE_SHARED_SMOKE, env_extra={"SMOKE_FIGURES": str(figures)},
    )  # fmt: skip
    assert out.returncode == 1 and not result["ok"]
    assert [r["recipe"] for r in result["results"]] == ["smoke"]
    assert [c["name"] for c in result["checks"] if not c["ok"]] == ["loss at step 12"]
    assert "FAIL" in out.stdout and "6 of 7 checks within their bands" in out.stdout
