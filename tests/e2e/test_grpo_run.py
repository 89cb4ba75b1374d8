"""GRPO on the real stack (Unsloth's CPU path, TRL's GRPOTrainer): the tiny model raises a reward
it can learn, every reward is logged under its name, TRL's loss is the clipped policy-gradient
formula of its own advantages and log-probabilities, and a run killed with SIGKILL resumes to the
same rewards and losses at every step."""

import contextlib
import json
import math
import signal

import pytest
import torch
from cli_helpers import ROOT, runner
from test_lifecycle import logged, resume, start, wait_for

from finetune.data.store import prepared_data
from finetune.recipe.schema import load_recipe
from finetune.runs.run_folder import SEAL
from finetune.train import grpo, training

TASKS = ROOT / "data_samples" / "code_tasks.jsonl"
REWARDS = ("one_token", "tests", "format", "length")


def grpo_recipe(folder, tasks: int = 44, **train) -> str:
    """The smoke recipe (tiny Llama 3, lr 1e-2) trained with GRPO on the first ``tasks`` of the
    shipped tasks: each step one task's 8 completions of 16 tokens, rewarded mostly
    by tests/e2e/grpo_rewards.py's token share (the tests, format and length rewards weigh
    little: a random model scores the same on them every time, which moves no advantage)."""
    settings = {
        "method": "grpo",
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_generations": 8,
        "max_completion_length": 16,
        "temperature": 0.3,
        "max_steps": 16,
        "save_steps": 8,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "seed": 1,
        **train,
    }
    subset = folder / "tasks.jsonl"
    subset.write_text("".join(TASKS.read_text().splitlines(keepends=True)[:tasks]))
    recipe = {
        "extends": str(ROOT / "recipes" / "smoke.yaml"),
        "description": "GRPO on the tiny model",
        "data": {"train": str(subset)},
        "train": settings,
        "rewards": [
            {"reward": "tests.e2e.grpo_rewards:one_token"},
            {"reward": "tests", "weight": 0.01},
            {"reward": "format", "weight": 0.01},
            {"reward": "length", "weight": 0.01, "target_tokens": 8},
        ],
        "output": {"samples": 1, "sample_tokens": 8},
    }
    path = folder / "smoke.yaml"  # the run folder is named after it: test_lifecycle's helpers find it
    path.write_text(json.dumps(recipe))
    return str(path)


def run_dir_of(output):
    (run_dir,) = (output / "smoke").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    recipe = grpo_recipe(folder)
    process = start(recipe, "--allow-code-execution", output=folder / "runs")
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return recipe, run_dir_of(folder / "runs")


def test_the_tiny_model_raises_a_reward_it_can_learn_and_every_reward_is_logged(grpo_run):
    _, run_dir = grpo_run
    reward = logged(run_dir, "rewards/one_token/mean")
    assert sorted(reward) == list(range(1, 17))
    first, last = [reward[s] for s in range(1, 5)], [reward[s] for s in range(13, 17)]
    # Seeded: about 0.01 at first, 1.0 by the end on this CPU; asserted with room.
    assert sum(last) / 4 > sum(first) / 4 + 0.4, reward
    for name in REWARDS:
        assert len(logged(run_dir, f"rewards/{name}/mean")) == 16, name
    # What a random model earns from the others: no test passes, no block is closed, every
    # completion runs to the limit (16 tokens, 8 over the target: the length penalty's -1).
    assert set(logged(run_dir, "rewards/tests/mean").values()) == {0.0}
    assert set(logged(run_dir, "rewards/format/mean").values()) == {0.0}
    assert set(logged(run_dir, "rewards/length/mean").values()) == {-1.0}
    # The weighted sum TRL computes the advantages from.
    total = logged(run_dir, "reward")
    for step, value in total.items():
        assert value == pytest.approx(reward[step] + 0.01 * -1.0, abs=1e-6)
    # The report: each reward's first and last mean, the completions' length, the curves.
    report = (run_dir / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- rewards (first -> last"))
    assert f"one_token {reward[1]:.4f} -> {reward[16]:.4f}" in line and "tests 0.0000 -> 0.0000" in line
    assert "- completions: mean length 16.0 -> 16.0 tokens, share cut at max_completion_length 1.00" in report
    assert "![rewards, completion lengths and KL](grpo.png)" in report
    assert (run_dir / "grpo.png").stat().st_size > 10_000
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["steps_per_epoch"] == 44 and plan["total_steps"] == 16 and plan["lr_per_step"] == [0.01] * 16
    assert list(logged(run_dir, "learning_rate").values()) == plan["lr_per_step"]
    # The plan counted the step's sampling: 8 completions of the longest prompt + 16 tokens.
    longest = max(plan["data"]["token_lengths"])
    assert plan["budget"]["tokens_per_micro_batch"] == 8 * (longest + 16)
    cache = [k for k in plan["budget"]["memory_bytes"] if k.startswith("generation key/value cache")]
    assert cache == [f"generation key/value cache (8 completions x {longest + 16} tokens)"]


def test_tensorboard_holds_each_reward_the_run_logged(grpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = grpo_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("reward", *(f"rewards/{name}/mean" for name in REWARDS), "completions/mean_length"):
        board = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert board == pytest.approx(logged(run_dir, key), rel=1e-6), key


def test_humaneval_after_grpo_reports_both_models_and_that_the_tasks_held_none_of_it(grpo_run):
    _, run_dir = grpo_run
    out = runner("eval", str(run_dir), "--allow-code-execution", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HumanEval: 164 tasks, chat prompt" in out.stdout
    assert [
        line.split()[0] for line in out.stdout.splitlines() if line.startswith(("base ", "adapter "))
    ] == [
        "base",
        "adapter",
    ]
    # The tasks GRPO trained on were checked for HumanEval's problems before training.
    assert "training data: checked before training" in out.stdout
    assert "no row holds a HumanEval problem" in out.stdout


# What tells two runs' steps apart: num_tokens (prompt and completion tokens so far) and the
# entropy say which task each step drew.
SAME_AT_EVERY_STEP = ("loss", "reward", "rewards/one_token/mean", "num_tokens", "entropy", "learning_rate")


@pytest.fixture(scope="module")
def four_tasks(tmp_path_factory):
    """4 tasks, so 10 steps are 2.5 epochs: the recipe and its uninterrupted run."""
    folder = tmp_path_factory.mktemp("four")
    recipe = grpo_recipe(folder, tasks=4, max_steps=10, save_steps=6)
    done = start(recipe, "--allow-code-execution", output=folder / "whole")
    _, stderr = done.communicate(timeout=900)
    assert done.returncode == 0, stderr[-3000:]
    return recipe, run_dir_of(folder / "whole")


def test_a_grpo_run_killed_with_sigkill_resumes_to_the_same_rewards_and_losses(four_tasks, tmp_path):
    """Killed in its second epoch: the resumed run draws that epoch's order of tasks, not the
    first's again (train/grpo.py's EpochSeededSampler)."""
    recipe, whole = four_tasks
    killed = start(recipe, "--allow-code-execution", output=tmp_path / "killed")
    wait_for(lambda: list(tmp_path.glob(f"killed/smoke/*/checkpoints/checkpoint-6/{SEAL}")), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = run_dir_of(tmp_path / "killed")
    assert not (run_dir / "adapter").exists()
    resumed = resume(run_dir, "--allow-code-execution")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-6" in resumed.stdout
    assert json.loads((run_dir / "plan.json").read_text())["steps_per_epoch"] == 4
    for key in SAME_AT_EVERY_STEP:
        assert logged(run_dir, key) == logged(whole, key), key


def test_ctrl_c_stops_a_grpo_run_with_a_checkpoint_and_the_resume_ends_as_the_whole_run(four_tasks, tmp_path):
    recipe, whole = four_tasks
    run = start(recipe, "--allow-code-execution", output=tmp_path)
    wait_for(lambda: len(list(tmp_path.glob("smoke/*/log.jsonl"))) and logged_steps(tmp_path) >= 2, run)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    stopped = max(logged(run_dir, "loss"))
    assert stopped < 10 and f"stopped after step {stopped} with a checkpoint" in stderr
    resumed = resume(run_dir, "--allow-code-execution")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped}" in resumed.stdout
    for key in SAME_AT_EVERY_STEP:
        assert logged(run_dir, key) == logged(whole, key), key


def logged_steps(output) -> int:
    """Steps the running trainer has finished writing to log.jsonl so far."""
    (log,) = output.glob("smoke/*/log.jsonl")
    return sum('"loss"' in line for line in log.read_text().split("\n")[:-1])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One generation round in process, with two optimizer passes over it (num_iterations 2: TRL
    keeps the sampling policy's log-probabilities), and the LoRA weights moved after it."""
    folder = tmp_path_factory.mktemp("grpo-loss")
    recipe = load_recipe(grpo_recipe(folder, num_iterations=2, beta=0.04, max_steps=2, save_steps=None))
    model, tokenizer = training.load_model(recipe)
    model = training.add_lora(model, recipe)
    store = prepared_data(recipe)
    trainer = training.build_trainer(model, tokenizer, store.dataset("train"), recipe, folder / "out")
    assert isinstance(trainer, grpo.FinetuneGRPOTrainer)
    torch.manual_seed(0)
    rows = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # what train() sets for its accumulation window
    model.train()
    inputs = trainer._prepare_inputs(rows)  # generates and scores
    with torch.no_grad():  # the policy moves away from the one that sampled
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0, 0.05)
    return recipe, model, trainer, inputs, store


def test_grpo_samples_from_exactly_the_prompt_tokens_the_data_preparation_made(generated):
    recipe, _, trainer, inputs, store = generated
    prepared = {tuple(ids) for ids in store.dataset("train")["input_ids"]}
    mask = inputs["prompt_mask"].bool()
    sampled = {tuple(row[m].tolist()) for row, m in zip(inputs["prompt_ids"], mask, strict=True)}
    assert sampled <= prepared and len(sampled) == 1  # one task's 8 completions
    (prompt,) = sampled
    assert prompt.count(trainer.processing_class.bos_token_id) == 1  # no second BOS


def test_with_a_reference_a_grpo_checkpoint_holds_the_trained_adapter_alone(generated, tmp_path):
    """beta > 0: TRL keeps a frozen copy of the adapter ("ref") as the reference; a checkpoint that
    saved it too would resume from it (train/our_trainer.py's TrainedAdapterOnly)."""
    _, model, trainer, _, _ = generated
    assert set(model.peft_config) == {"default", "ref"}
    trainer._save(str(tmp_path / "checkpoint"))
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "checkpoint" / "ref").exists()


def test_grpos_loss_is_the_clipped_policy_gradient_of_its_advantages_and_log_probabilities(generated):
    recipe, model, trainer, inputs, _ = generated
    options = recipe.train.method_options()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, inputs, num_items_in_batch=None))
    # By hand, from the model's full logits: each completion token's log-probability at the
    # sampling temperature, the ratio to the sampling policy's, clipped (DAPO's loss: summed over
    # every completion token of the batch, divided by their count), and beta x the k3 KL estimate
    # to the reference (the adapter switched off), weighted by the ratio (TRL's bias correction).
    prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt, completion], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)

    def logps(adapter: bool) -> torch.Tensor:
        with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        logits = logits[:, prompt.size(1) - 1 : -1] / options["temperature"]
        return torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)

    policy, reference = logps(True), logps(False)
    advantages = inputs["advantages"][:, None]
    ratio = torch.exp(policy - inputs["old_per_token_logps"])
    low, high = 1 - options["epsilon"], 1 + options["epsilon"]
    per_token = -torch.min(ratio * advantages, torch.clamp(ratio, low, high) * advantages)
    kl = (torch.exp(reference - policy) - (reference - policy) - 1) * ratio
    per_token = per_token + options["beta"] * kl
    mask = inputs["completion_mask"].float()
    expected = float((per_token * mask).sum() / mask.sum())
    assert math.isfinite(loss) and abs(loss) > 1e-4  # the moved weights make the ratio differ from 1
    assert loss == pytest.approx(expected, rel=2e-2, abs=1e-4)
