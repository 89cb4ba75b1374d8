"""data_samples/code_tasks.jsonl: short Python tasks written for this project, in the format
`eval --tasks FILE` reads (HumanEval's: task_id, prompt, test, entry_point, and a canonical
solution), for evaluating on tasks of one's own and for training whose reward is the tests.

Each task's check is one assert per line, so a reward can count the asserts that pass; the tests
below hold the set to that: every canonical solution passes in the sandbox, a solution that
returns None passes none, and no task is one of HumanEval's (which stays held out)."""

import json
from pathlib import Path

from finetune.base.sandbox import run_programs
from finetune.data.contamination import benchmark_matches
from finetune.evaluate.evaluation import program, read_tasks

TASKS_FILE = Path(__file__).resolve().parent.parent / "data_samples" / "code_tasks.jsonl"


def test_at_least_40_tasks_each_checked_by_several_asserts_of_one_line():
    rows = [json.loads(line) for line in TASKS_FILE.read_text().splitlines()]
    tasks = read_tasks(str(TASKS_FILE))
    assert len(rows) == len(tasks) >= 40  # task ids are unique
    for task in tasks.values():
        header, *body = task["test"].rstrip("\n").split("\n")
        assert header == "def check(candidate):", task["task_id"]
        assert len(body) >= 2, task["task_id"]
        assert all(line.startswith("    assert ") and "candidate(" in line for line in body), task["task_id"]
        assert task["prompt"].startswith(f"def {task['entry_point']}("), task["task_id"]


def test_each_canonical_solution_passes_and_a_solution_returning_none_passes_no_task():
    tasks = read_tasks(str(TASKS_FILE))
    ids = list(tasks)
    solved = run_programs([program(tasks[t], tasks[t]["canonical_solution"]) for t in ids])
    assert [t for t, outcome in zip(ids, solved, strict=True) if not outcome.passed] == []
    wrong = run_programs([program(tasks[t], "    return None\n") for t in ids])
    assert [t for t, outcome in zip(ids, wrong, strict=True) if outcome.passed] == []


def test_no_task_is_a_humaneval_problem():
    tasks = read_tasks(str(TASKS_FILE))
    overlapping = {
        task_id: matches
        for task_id, task in tasks.items()
        if (matches := benchmark_matches(task["prompt"] + task["canonical_solution"]))
    }
    assert overlapping == {}
