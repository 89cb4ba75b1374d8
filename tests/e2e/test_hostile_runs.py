"""Our hostile set's damaged run folders (benchmarks/hostile.py), on a copy of one trained run:
where the verb reads the damaged file, one sentence naming it and what to do, exit 2, before
anything heavy loads; and a finished run is not resumed. (Where the damage does not touch what the
verb reads, it works: `benchmarks/hostile.py` runs those too, a model load or more each.)"""

import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import hostile  # noqa: E402

REFUSED = [
    "resume: run.json not JSON",
    "resume: manifest.json missing keys",
    "export: adapter safetensors truncated",
    "export: adapter_config.json broken",
    "generate: adapter safetensors truncated",
    "generate: adapter_config.json broken",
    "calibration: budget.json truncated",
    "resume of a finished run",
]
CASES = {case.name: case for case in hostile.CASES}


@pytest.mark.parametrize("name", REFUSED)
def test_a_damaged_run_folder_is_named_in_one_sentence(name, finished_run, tmp_path):
    case = CASES[name]
    out = run_cli(*case.make(tmp_path, finished_run))
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and case.say in errors[0], out.stderr
    assert "heavy imports: []" in out.stdout  # refused before torch, Unsloth or a model load


def test_resuming_a_finished_run_writes_nothing(finished_run, tmp_path):
    """One sentence, exit 2, and the run folder exactly as it was: no lock, no report rewritten."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    before = {p.relative_to(copy): p.stat().st_mtime_ns for p in copy.rglob("*")}
    out = run_cli("resume", str(copy))
    assert out.returncode == 2 and "has finished" in out.stderr and "nothing to resume" in out.stderr
    assert {p.relative_to(copy): p.stat().st_mtime_ns for p in copy.rglob("*")} == before
