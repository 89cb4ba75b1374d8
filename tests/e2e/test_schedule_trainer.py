"""The schedule preview against the real trainer: same step count, same LR at every optimizer step."""

from pathlib import Path

import pytest
import torch
from data_helpers import load_conversations
from transformers import TrainerCallback

from finetune.data.store import prepared_data
from finetune.plan.data_plan import plan_data
from finetune.plan.schedule import plan_schedule
from finetune.recipe.schema import load_recipe
from finetune.train import training

ROOT = Path(__file__).resolve().parents[2]
CONVERSATIONS = load_conversations([str(ROOT / "data_samples" / "code_chat.jsonl")])


class _RecordLr(TrainerCallback):
    """The LR in the optimizer at the moment it steps (before the scheduler moves it on)."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # One model for every case: each case builds its own trainer (a fresh optimizer and scheduler)
    # and reads only the step count and the learning rates, which the LoRA weights a previous case
    # trained do not change. Loading it for each of the 17 cases cost 3-6 s a case here.
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    model, tokenizer = training.load_model(recipe)
    return training.add_lora(model, recipe), tokenizer


def run_trainer(model_and_tokenizer, tmp_path, overrides, num_examples=None):
    model, tokenizer = model_and_tokenizer
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["train.logging_steps=1", *overrides])
    # The rows as a run gets them (from the prepared-data store); the first num_examples if given.
    dataset = prepared_data(recipe).dataset("train")
    if num_examples is not None:
        dataset = dataset.select(range(num_examples))
    trainer = training.build_trainer(model, tokenizer, dataset, recipe, tmp_path)
    recorder = _RecordLr()
    trainer.add_callback(recorder)
    trainer.train()
    return recipe, trainer, recorder.lrs


@pytest.mark.parametrize(
    "num_examples, batch, accumulation, epochs",
    [
        (7, 2, 3, 2),  # 4 micro-batches per epoch: the second step of each epoch is a partial window
        (10, 3, 2, 1.5),  # fractional epochs round the step count up
        (5, 1, 4, 1),  # 5 micro-batches, accumulation 4: a final window of one micro-batch
        (9, 4, 1, 2),  # the last micro-batch is short, no accumulation
    ],
)
def test_step_count_matches_the_trainer(
    model_and_tokenizer, tmp_path, num_examples, batch, accumulation, epochs
):
    overrides = [
        "train.max_steps=null",
        "train.warmup_steps=0",
        f"train.num_train_epochs={epochs}",
        f"train.per_device_train_batch_size={batch}",
        f"train.gradient_accumulation_steps={accumulation}",
    ]
    recipe, trainer, lrs = run_trainer(model_and_tokenizer, tmp_path, overrides, num_examples)
    plan = plan_schedule(num_examples, recipe.train)
    assert plan.total_steps == trainer.state.max_steps == trainer.state.global_step == len(lrs)


@pytest.mark.parametrize(
    "data_settings, expected_report",
    [
        # Rows over 150 tokens are dropped and counted.
        (["model.max_seq_length=150", "data.overlong=drop"], "rows dropped: longer than max_seq_length 150"),
        # Cut to 52 tokens, rows whose answer starts later lose all of it and are dropped as untrained.
        (["model.max_seq_length=52", "data.overlong=truncate"], "dropped: no trained token left"),
        # Packing: 40 rows of 107-612 tokens into 1024-token sequences, then batches of packed sequences.
        (["data.packing=true"], None),
        (["data.packing=true", "model.max_seq_length=200", "data.overlong=truncate"], "truncated to"),
    ],
    ids=["drop-long", "truncate-untrained", "packing", "packing-truncated"],
)
def test_step_count_after_dropping_and_packing_matches_the_trainer(
    model_and_tokenizer, tmp_path, data_settings, expected_report
):
    overrides = [
        "train.max_steps=null",
        "train.warmup_steps=0",
        "train.num_train_epochs=1",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=2",
        *data_settings,
    ]
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", overrides)
    # Unsloth keeps packing off on the CPU (see plan.engine.packing_runs): there the plan must say so and
    # count unpacked rows; on a GPU the packed sequences.
    on_gpu = torch.cuda.is_available()
    data = plan_data(recipe, on_gpu)
    if expected_report:
        assert any(expected_report in line for line in data.report), data.report
    if recipe.data.packing and not on_gpu:
        assert data.sequences == len(data.lengths) and any("packing is off" in r for r in data.report)
    else:
        assert data.sequences < len(CONVERSATIONS)  # rows dropped, or packed several to a sequence
    plan = plan_schedule(data.sequences, recipe.train)
    _, trainer, lrs = run_trainer(model_and_tokenizer, tmp_path, overrides)
    rows = trainer.train_dataset
    assert len(rows) == data.sequences
    if data.packing:
        # TRL's best-fit-decreasing packing records the examples in each packed sequence: together
        # they are exactly the planned rows (lengths as the plan has them, every token kept), and
        # no packed sequence is longer than max_seq_length.
        packed = rows["seq_lengths"]
        assert sorted(n for sequence in packed for n in sequence) == sorted(data.lengths)
        assert [len(row) for row in rows["input_ids"]] == [sum(sequence) for sequence in packed]
        assert max(len(row) for row in rows["input_ids"]) <= recipe.model.max_seq_length
        assert sum(len(row) for row in rows["input_ids"]) == sum(data.lengths)
    else:
        assert [len(row) for row in rows["input_ids"]] == data.lengths
    assert plan.total_steps == trainer.state.max_steps == trainer.state.global_step == len(lrs)


@pytest.mark.parametrize(
    "schedule",
    [
        ["train.lr_scheduler_type=cosine", "train.warmup_steps=3"],
        ["train.lr_scheduler_type=linear", "train.warmup_steps=null", "train.warmup_ratio=0.2"],
        ["train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr=1.0e-3", "train.warmup_steps=2"],
        ["train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_rate=0.1", "train.warmup_steps=2"],
        ["train.lr_scheduler_type=constant_with_warmup", "train.warmup_steps=4"],
        [
            "train.lr_scheduler_type=polynomial",
            "train.power=2.0",
            "train.min_lr=1.0e-3",
            "train.warmup_steps=2",
        ],
        [
            "train.lr_scheduler_type=warmup_stable_decay",
            "train.decay_ratio=0.5",
            "train.min_lr_rate=0.1",
            "train.warmup_steps=1",
        ],
        ["train.lr_scheduler_type=step", "train.step_size=2", "train.gamma=0.5", "train.warmup_steps=1"],
        ["train.lr_scheduler_type=exponential", "train.gamma=0.8", "train.warmup_steps=2"],
    ],
    ids=[
        "cosine",
        "linear",
        "cosine-min-lr",
        "cosine-min-lr-rate",
        "constant-warmup",
        "polynomial",
        "warmup-stable-decay",
        "step",
        "exponential",
    ],
)
def test_every_step_uses_the_previewed_lr(model_and_tokenizer, tmp_path, schedule):
    overrides = [
        "train.max_steps=null",
        "train.num_train_epochs=1",
        "train.gradient_accumulation_steps=2",
        *schedule,
    ]
    recipe, trainer, lrs = run_trainer(model_and_tokenizer, tmp_path, overrides, 24)
    plan = plan_schedule(24, recipe.train)
    assert len(lrs) == plan.total_steps == 6
    for step, (used, previewed) in enumerate(zip(lrs, plan.lrs, strict=True), start=1):
        assert abs(used - previewed) <= 1e-12 * abs(previewed), (step, used, previewed)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx(plan.lrs, rel=1e-12, abs=0)
