"""Our own hostile set (benchmarks/hostile.py), the cases that need no trained run, each run
in-process through runner.py's main: the exit status it must give, one sentence saying what it must,
no exception, and in about a second. (The cases on damaged run folders: tests/e2e/test_hostile_runs.py;
the fuzzed readers: tests/test_recipe_errors.py and tests/test_data.py.)"""

import sys
import time
from pathlib import Path

import pytest

from finetune.cli import commands

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import hostile  # noqa: E402

# The store's cases damage the shared cache: tests/test_store.py holds them on a cache of its own.
CASES = [case for case in hostile.CASES if not case.needs_run and case.kind != "store"]
SECONDS = 5.0  # of CPU, in-process, the data already prepared: well under a second each; a hang is minutes


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_gets_its_answer_in_one_sentence(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(hostile.ROOT)
    argv = case.make(tmp_path)
    started, cpu = time.monotonic(), time.process_time()
    try:
        code = commands.main(argv)
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    seconds = time.monotonic() - started
    cpu = time.process_time() - cpu
    out = capsys.readouterr()
    verdict = hostile.classify(case, code, out.out, out.err, cpu)
    assert verdict == "held", f"{verdict}: exit {code} in {seconds:.1f} s; stderr: {out.err[-1500:]}"
    assert cpu < SECONDS, f"{cpu:.1f} s of CPU"  # what the input cost, whatever else the machine runs


def test_the_set_covers_every_class_of_the_issue():
    """Data, recipes, schedules, flags, completions, templates and damaged run folders."""
    kinds = {case.kind for case in hostile.CASES}
    assert kinds == {"data", "recipe", "schedule", "flags", "completions", "template", "run", "store"}
