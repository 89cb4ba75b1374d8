"""Pure schedule math: step counting, warmup, LR per step, milestones, advice (no torch)."""

import json
import math
from pathlib import Path

import pytest
from cli_helpers import runner

from finetune.plan.schedule import (
    advise,
    count_optimizer_steps,
    describe_plan,
    plan_as_dict,
    plan_schedule,
    steps_per_epoch,
)
from finetune.recipe.schema import TrainSection

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "examples, batch, accumulation, expected",
    [(40, 2, 2, 10), (41, 2, 2, 11), (7, 2, 3, 2), (5, 1, 4, 2), (1, 8, 8, 1), (64, 4, 4, 4), (65, 4, 4, 5)],
)
def test_steps_per_epoch_count_the_partial_window(examples, batch, accumulation, expected):
    assert steps_per_epoch(examples, batch, accumulation) == expected


def test_total_steps_from_epochs_or_max_steps():
    train = TrainSection(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=1.5)
    assert count_optimizer_steps(10, train) == math.ceil(1.5 * 2)
    assert count_optimizer_steps(10, train.model_copy(update={"max_steps": 7})) == 7


def test_cosine_with_warmup_formula():
    train = TrainSection(learning_rate=2e-4, warmup_steps=10, max_steps=110, lr_scheduler_type="cosine")
    plan = plan_schedule(1000, train)
    assert plan.lrs[0] == 0.0  # transformers' warmup starts at 0
    assert plan.lrs[5] == pytest.approx(1e-4)
    assert plan.lrs[10] == 2e-4  # peak on the first step after warmup
    t, total = 50, 100  # lr = final + 0.5 (peak - final)(1 + cos(pi t / T)), t counted from warmup end
    assert plan.lrs[10 + t] == pytest.approx(0.5 * 2e-4 * (1 + math.cos(math.pi * t / total)), rel=1e-12)
    assert plan.final_lr == pytest.approx(0.5 * 2e-4 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-12)


def test_min_lr_floor_and_linear_decay():
    floor = plan_schedule(
        100,
        TrainSection(
            learning_rate=1e-4,
            max_steps=50,
            warmup_steps=0,
            lr_scheduler_type="cosine_with_min_lr",
            min_lr=1e-5,
        ),
    )
    assert min(floor.lrs) >= 1e-5 - 1e-18 and floor.lrs[0] == pytest.approx(1e-4)
    rate = plan_schedule(
        100,
        TrainSection(
            learning_rate=1e-4,
            max_steps=50,
            warmup_steps=0,
            lr_scheduler_type="cosine_with_min_lr",
            min_lr_rate=0.1,
        ),
    )
    assert rate.lrs == pytest.approx(floor.lrs, rel=1e-12)
    linear = plan_schedule(
        100, TrainSection(learning_rate=1e-4, max_steps=10, warmup_ratio=0.2, lr_scheduler_type="linear")
    )
    assert linear.warmup_steps == 2
    assert linear.lrs == pytest.approx(
        [0, 5e-5, 1e-4, 8.75e-5, 7.5e-5, 6.25e-5, 5e-5, 3.75e-5, 2.5e-5, 1.25e-5]
    )


def test_polynomial_decays_to_its_end_lr_with_power():
    train = TrainSection(
        learning_rate=1e-3,
        max_steps=12,
        warmup_steps=2,
        lr_scheduler_type="polynomial",
        power=2.0,
        min_lr=1e-4,
    )
    plan = plan_schedule(100, train)
    assert plan.lrs[:3] == pytest.approx([0, 5e-4, 1e-3], rel=1e-12)
    for k in range(2, 12):  # lr = (peak - end) (1 - t/T)^power + end
        expected = (1e-3 - 1e-4) * (1 - (k - 2) / 10) ** 2 + 1e-4
        assert plan.lrs[k] == pytest.approx(expected, rel=1e-12)
    default_end = plan_schedule(100, train.model_copy(update={"min_lr": None, "power": None}))
    assert default_end.lrs[-1] == pytest.approx((1e-3 - 1e-7) * 0.1 + 1e-7, rel=1e-12)  # transformers' 1e-7


def test_warmup_stable_decay_holds_the_peak_then_decays_to_the_floor():
    train = TrainSection(
        learning_rate=1e-3,
        max_steps=20,
        warmup_steps=4,
        lr_scheduler_type="warmup_stable_decay",
        decay_ratio=0.25,
        min_lr_rate=0.1,
    )
    plan = plan_schedule(100, train)
    # Warmup starts at the floor, not at 0; 11 stable steps; 5 decay steps (ceil of 20 x 0.25).
    assert plan.lrs[:4] == pytest.approx([1e-4, 3.25e-4, 5.5e-4, 7.75e-4], rel=1e-12)
    assert plan.lrs[4:15] == [1e-3] * 11
    for k in range(15, 20):
        cosine = 0.5 * (1 + math.cos(math.pi * (k - 15) / 5))
        assert plan.lrs[k] == pytest.approx(1e-3 * (cosine * 0.9 + 0.1), rel=1e-12)


def test_step_and_exponential_decays_after_warmup():
    step = TrainSection(
        learning_rate=1e-3, max_steps=10, warmup_steps=2, lr_scheduler_type="step", step_size=3, gamma=0.5
    )
    assert plan_schedule(100, step).lrs == pytest.approx(
        [0, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-12
    )
    exponential = TrainSection(
        learning_rate=1e-3, max_steps=6, warmup_steps=1, lr_scheduler_type="exponential", gamma=0.9
    )
    assert plan_schedule(100, exponential).lrs == pytest.approx(
        [0, 1e-3, 9e-4, 8.1e-4, 7.29e-4, 6.561e-4], rel=1e-12
    )


def test_warmup_ratio_rounds_up_like_transformers():
    plan = plan_schedule(100, TrainSection(max_steps=30, warmup_ratio=0.03))
    assert plan.warmup_steps == 1  # ceil(0.9)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"max_steps": 10, "warmup_steps": 6}, "warmup covers 60% of training"),
        ({"max_steps": 1000, "warmup_steps": 2}, "outside the usual 1-20%"),
        ({"max_steps": 100, "warmup_steps": 0, "learning_rate": 5e-4}, "no warmup at learning_rate 0.0005"),
        ({"max_steps": 100, "warmup_steps": 5, "learning_rate": 0.05}, "far outside the usual LoRA range"),
        ({"max_steps": 100, "warmup_steps": 5, "learning_rate": 1e-7}, "far outside the usual LoRA range"),
    ],
)
def test_advice_warns_with_the_fix(settings, expected):
    errors, warnings = advise(plan_schedule(100, TrainSection(**settings)), TrainSection(**settings))
    assert errors == [] and any(expected in w for w in warnings)


def test_advice_on_decays_that_cannot_happen():
    wsd = TrainSection(max_steps=10, warmup_steps=5, lr_scheduler_type="warmup_stable_decay", decay_ratio=0.6)
    errors, _ = advise(plan_schedule(100, wsd), wsd)
    assert errors == [
        "warmup (5 steps) plus decay (6 steps, decay_ratio 0.6) is longer than training (10 steps), so the "
        "decay is cut short; lower decay_ratio or the warmup"
    ]
    step = TrainSection(max_steps=100, warmup_steps=5, lr_scheduler_type="step", step_size=95, gamma=0.5)
    _, warnings = advise(plan_schedule(100, step), step)
    assert any("step_size 95 is not shorter than the 95 steps after warmup" in w for w in warnings)


def test_advice_refuses_warmup_as_long_as_training():
    train = TrainSection(
        num_train_epochs=1, warmup_steps=20, per_device_train_batch_size=2, gradient_accumulation_steps=1
    )
    errors, _ = advise(plan_schedule(30, train), train)  # 15 steps, 20 of warmup
    assert errors and "never reaches its peak" in errors[0]


def test_a_sound_schedule_gets_no_advice():
    train = TrainSection(learning_rate=2e-4, max_steps=1000, warmup_ratio=0.03)
    assert advise(plan_schedule(100, train), train) == ([], [])


def test_plan_command_prints_json_with_every_step_and_writes_the_plot(tmp_path):
    out = runner("plan", "recipes/code-gen.yaml", "--json", hide_gpu=True)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert len(plan["lr_per_step"]) == plan["total_steps"] == 6  # 40 rows, 2 x 8 per step, 2 epochs
    assert plan["warmup_steps"] == 1 and plan["peak_lr"] == 1e-4
    assert plan["milestones"][-1] == {"fraction": 1.0, "step": 6, "lr": plan["lr_per_step"][-1]}

    png = tmp_path / "lr.png"
    out = runner("plan", "recipes/code-gen.yaml", "--png", str(png), hide_gpu=True)
    assert out.returncode == 0, out.stderr
    assert "schedule: cosine, 6 optimizer steps" in out.stdout and "warmup: 1 step (" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plan_as_dict(plan_schedule(40, TrainSection(max_steps=3)))["total_steps"] == 3


def test_one_warmup_step_is_one_step():
    train = TrainSection(warmup_steps=1, max_steps=10)
    assert describe_plan(plan_schedule(100, train))[1].startswith("warmup: 1 step (10.0% of training)")
    assert describe_plan(plan_schedule(100, TrainSection(warmup_steps=2, max_steps=10)))[1].startswith(
        "warmup: 2 steps ("
    )
