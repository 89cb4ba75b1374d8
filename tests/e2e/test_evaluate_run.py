"""`runner.py eval RUN_DIR` on a real smoke run: the base model and the adapter answer through the
real stack, the answers run confined, and the figures land in eval/humaneval.json and report.md.
The tiny model's pass@1 is 0, as expected of random weights: these tests check the pipeline."""

import json

import pytest
import torch
from cli_helpers import runner

from finetune.evaluate.evaluation import read_tasks
from finetune.recipe.schema import load_recipe
from finetune.train import inference, stack


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A smoke run whose recipe asks for HumanEval after training, on four of its tasks."""
    folder = tmp_path_factory.mktemp("eval")
    tasks = folder / "tasks.jsonl"
    chosen = list(read_tasks("humaneval").values())[:4]
    fields = ("task_id", "prompt", "test", "entry_point")
    tasks.write_text("".join(json.dumps({k: t[k] for k in fields}) + "\n" for t in chosen))
    out = runner(
        "recipes/smoke.yaml",
        "train.max_steps=4",
        f"output.dir={folder}",
        "evaluate.humaneval=true",
        f"evaluate.tasks={tasks}",
        "evaluate.max_new_tokens=16",
        "--allow-code-execution",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (folder / "smoke").iterdir()
    return out, run_dir, tasks


def test_a_recipe_asking_for_humaneval_is_evaluated_after_training(evaluated):
    out, run_dir, tasks = evaluated
    assert out.stdout.index("Done: 4 steps") < out.stdout.index(f"{tasks}: 4 tasks, chat prompt")
    lines = out.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.strip().startswith("pass@1"))
    assert lines[header + 1].split()[:3] == ["base", "0.000", "0/4"]
    assert lines[header + 2].split()[:3] == ["adapter", "0.000", "0/4"]
    assert "changed: 0 tasks better after training, 0 worse; exact sign test p = 1.000" in out.stdout
    assert f"training data: not checked against {tasks} (only HumanEval's problems are)" in out.stdout
    document = json.loads((run_dir / "eval" / "humaneval.json").read_text())
    assert document["tasks"] == 4 and document["prompt"] == "chat"
    assert document["settings"]["max_new_tokens"] == 16
    records = document["completions"]
    assert [(r["model"], r["task_id"]) for r in records] == [
        (model, f"HumanEval/{k}") for model in ("base", "adapter") for k in range(4)
    ]
    assert all(not r["passed"] and r["result"] for r in records)
    # The same prompts, answered differently: the adapter was trained (at a high LR) and is on.
    base = [r["answer"] for r in records if r["model"] == "base"]
    assert base != [r["answer"] for r in records if r["model"] == "adapter"]
    assert document["models"]["base"]["generation_seconds"] > 0
    report = (run_dir / "report.md").read_text()
    assert report.count("## HumanEval") == 1 and f"{tasks}: 4 tasks" in report
    assert report.index("## Figures") < report.index("## HumanEval")


def test_eval_of_a_finished_run_answers_all_164_and_replaces_the_reports_section(evaluated):
    _, run_dir, tasks = evaluated
    # The run's recipe names its own four tasks; HumanEval's 164 are asked for by name.
    out = runner(
        "eval", str(run_dir), "--allow-code-execution", "--tasks", "humaneval", "--max-new-tokens", "8"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HumanEval: 164 tasks, chat prompt" in out.stdout and "up to 8 new tokens" in out.stdout
    assert "0/164" in out.stdout and "answering" in out.stderr  # the progress bar
    # Whether what it trained on was checked for these problems (before training, by the plan).
    checked = "training data: checked before training (13-token windows of code covering at least 30% of"
    assert checked in out.stdout and "no row holds a HumanEval problem" in out.stdout
    document = json.loads((run_dir / "eval" / "humaneval.json").read_text())
    assert len(document["completions"]) == 2 * 164 and document["tasks_name"] == "HumanEval"
    report = (run_dir / "report.md").read_text()
    assert report.count("## HumanEval") == 1 and "HumanEval: 164 tasks" in report
    assert checked in report
    assert f"{tasks}: 4 tasks" not in report  # the first evaluation's section, replaced


def test_sampled_answers_give_pass_at_k(evaluated):
    _, run_dir, tasks = evaluated
    out = runner(
        "eval", str(run_dir), "--allow-code-execution", "--tasks", str(tasks), "--max-new-tokens", "4",
        "--samples-per-task", "2", "--temperature", "0.8", "--k", "1", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 samples per task, temperature 0.8, top_p 0.95" in out.stdout
    assert "pass@2" in out.stdout and "0/8" in out.stdout
    records = json.loads((run_dir / "eval" / "humaneval.json").read_text())["completions"]
    assert [r["sample"] for r in records if r["model"] == "base"] == [0, 1] * 4


def test_the_base_model_is_the_adapters_base_with_the_adapter_switched_off(evaluated):
    """The base figures come from the loaded adapter with PEFT's disable_adapter, which Unsloth's
    LoRA kernels honour: its logits must be those of the base model loaded on its own."""
    _, run_dir, _ = evaluated
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = inference.load_adapter(run_dir / "adapter", recipe.model.max_seq_length)
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b").input_ids])
    with torch.no_grad():
        with model.disable_adapter():
            switched_off = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
    base_path = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    base, _ = stack.load_model(
        base_path, recipe.model.max_seq_length, recipe.model.load_in_4bit, recipe.model.dtype
    )
    stack.for_inference(base)
    with torch.no_grad():
        alone = base(input_ids=ids).logits
    torch.testing.assert_close(switched_off, alone)
    assert (adapted - alone).abs().max() > 1e-3  # and with it on, the adapter changes the answer
