"""Learning-rate schedule math and optimizer-step counting, in pure Python (no torch).

The numbers here are the ones the trainer will use, not an approximation: step counting follows
transformers' Trainer (micro-batches per epoch, a final partial accumulation window counts as a
step), and each schedule is transformers' own `get_scheduler` formula written out with the same
floating-point operations, so a preview matches the optimizer's LR to the last bit or nearly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from finetune.base.errors import UserError
from finetune.recipe.schema import TrainSection

# LR at these fractions of training are printed in the plan.
MILESTONES = (0.25, 0.5, 0.75, 1.0)
FULL_LIST_STEPS = 100_000  # `plan --json` and plan.json list every step's LR up to this many steps
PLOT_POINTS = 2_000  # the plot samples the schedule at most this often (a pixel is coarser)


class LearningRates(Sequence):
    """The LR of every optimizer step (``rates[k]`` for step k + 1), computed when asked: the
    preview costs the same for 30 steps or 10^30, and only a list of a few thousand is ever built."""

    def __init__(self, train: TrainSection, warmup_steps: int, total_steps: int):
        self.train, self.warmup_steps, self.total_steps = train, warmup_steps, total_steps

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(self.total_steps))]
        if index < 0:
            index += self.total_steps
        if not 0 <= index < self.total_steps:
            raise IndexError(index)
        # The optimizer's step k (1-based) runs with the LR set after k - 1 scheduler steps.
        return self.train.learning_rate * lr_factor(self.train, index, self.warmup_steps, self.total_steps)

    def sampled(self, points: int = PLOT_POINTS) -> list[tuple[int, float]]:
        """(1-based step, LR) at every step, or at ``points`` steps spread evenly (first and last
        included) when there are more."""
        if self.total_steps <= points:
            return list(enumerate(self, start=1))
        steps = sorted({1 + i * (self.total_steps - 1) // (points - 1) for i in range(points)})
        return [(step, self[step - 1]) for step in steps]

    def first_zero_after_warmup(self) -> int | None:
        """The first step (1-based, before the last) after warmup whose LR is 0, found by bisection:
        every schedule is non-increasing after its warmup, so a 0 stays 0."""
        low, high = self.warmup_steps, self.total_steps - 2  # indexes; the last step is excluded
        if low > high or self[high] != 0:
            return None
        while low < high:  # self[high] is 0: the first index in [low, high] whose LR is 0
            middle = (low + high) // 2
            if self[middle] == 0:
                high = middle
            else:
                low = middle + 1
        return low + 1


@dataclass(frozen=True)
class SchedulePlan:
    """Everything the preview prints; ``lrs[k]`` is the LR the optimizer uses on step k + 1."""

    scheduler: str
    num_examples: int
    effective_batch_size: int  # sequences per optimizer step, over every process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    final_lr: float
    lrs: LearningRates = field(repr=False)
    world_size: int = 1  # processes (GPUs) training together under torchrun
    generations: int | None = None  # GRPO: completions sampled per prompt (num_examples are prompts)

    def lr_at_fraction(self, fraction: float) -> tuple[int, float]:
        """(1-based step, LR) at a fraction of training."""
        step = min(self.total_steps, max(1, math.ceil(fraction * self.total_steps)))
        return step, self.lrs[step - 1]


def steps_per_epoch(
    num_examples: int, per_device_batch_size: int, gradient_accumulation_steps: int, world_size: int = 1
) -> int:
    """Optimizer steps in one pass: the last, partial accumulation window still makes a step. With
    several processes, accelerate deals the micro-batches out in turn and gives every process as
    many (the last ones topped up from the start), so each sees ceil(micro-batches / processes)."""
    micro_batches = math.ceil(num_examples / per_device_batch_size)  # the last micro-batch may be short
    per_process = math.ceil(micro_batches / world_size)
    return max(math.ceil(per_process / gradient_accumulation_steps), 1)


def grpo_steps_per_epoch(num_prompts: int, train: TrainSection, world_size: int = 1) -> int:
    """GRPO's optimizer steps in one pass over the prompts, as TRL 1.15's RepeatSampler deals them:
    each step's completions (per_device_train_batch_size x gradient_accumulation_steps, over every
    process) are num_generations for each of its prompts; a last group of prompts too few to fill
    a step is left out of the epoch; each generated batch is trained num_iterations times."""
    options = train.method_options()
    completions = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    prompts_per_step = completions // options["num_generations"]
    if num_prompts < prompts_per_step:
        # TRL's sampler would hand the trainer no batch at all: no step would run.
        raise UserError(
            f"{num_prompts} task{'' if num_prompts == 1 else 's'} kept, fewer than one step takes "
            f"({prompts_per_step}: {completions} "
            f"completions a step, num_generations {options['num_generations']} each); add tasks or lower "
            "per_device_train_batch_size x gradient_accumulation_steps"
        )
    return num_prompts // prompts_per_step * options["num_iterations"]


def epoch_steps(num_examples: int, train: TrainSection, world_size: int = 1) -> int:
    """Optimizer steps in one pass over the data, for the recipe's method."""
    if train.grpo():
        return grpo_steps_per_epoch(num_examples, train, world_size)
    return steps_per_epoch(
        num_examples, train.per_device_train_batch_size, train.gradient_accumulation_steps, world_size
    )


def count_optimizer_steps(num_examples: int, train: TrainSection, world_size: int = 1) -> int:
    """Total optimizer steps, as transformers' Trainer computes them (max_steps wins over epochs)."""
    if train.max_steps is not None:
        return train.max_steps
    return math.ceil(train.num_train_epochs * epoch_steps(num_examples, train, world_size))


def eval_every(train: TrainSection, total_steps: int) -> int | None:
    """Optimizer steps between evaluations, as transformers' Trainer computes them (a share below 1
    of the total, rounded up); None when the recipe never evaluates."""
    if train.eval_steps is None:
        return None
    return math.ceil(total_steps * train.eval_steps) if train.eval_steps < 1 else int(train.eval_steps)


def count_evaluations(train: TrainSection, total_steps: int) -> int:
    """Evaluations in a run: one every eval_every steps, and one at the last step when that is not
    already one (transformers' DefaultFlowCallback)."""
    every = eval_every(train, total_steps)
    if every is None:
        return 0
    return total_steps // every + (1 if total_steps % every else 0)


def count_warmup_steps(train: TrainSection, total_steps: int) -> int:
    """warmup_steps as given, or warmup_ratio of the total rounded up (transformers' rule)."""
    if train.warmup_steps is not None:
        return train.warmup_steps
    return math.ceil(total_steps * (train.warmup_ratio or 0.0))


# transformers' get_polynomial_decay_schedule_with_warmup ends at this LR unless told otherwise.
POLYNOMIAL_DEFAULT_END_LR = 1e-7
# Schedules transformers cannot build from SFTConfig alone; train/training.py installs them itself.
OWN_SCHEDULES = ("warmup_stable_decay", "step", "exponential")


def floor_rate(train: TrainSection) -> float:
    """The floor as a fraction of the peak LR, computed as transformers does (min_lr / lr)."""
    if train.min_lr_rate is not None:
        return train.min_lr_rate
    if train.min_lr is not None:
        return train.min_lr / train.learning_rate
    return 0.0


def polynomial_end_lr(train: TrainSection) -> float:
    """The LR polynomial decays to: the recipe's floor, or transformers' default."""
    if train.min_lr is not None:
        return train.min_lr
    if train.min_lr_rate is not None:
        return train.min_lr_rate * train.learning_rate
    return POLYNOMIAL_DEFAULT_END_LR


def count_decay_steps(train: TrainSection, total_steps: int) -> int:
    """warmup_stable_decay's decay phase: decay_ratio of all steps, rounded up like warmup_ratio."""
    return math.ceil(total_steps * train.decay_ratio)


def scheduler_kwargs(train: TrainSection) -> dict:
    """The lr_scheduler_kwargs that make transformers' scheduler follow the recipe."""
    if train.lr_scheduler_type == "cosine_with_min_lr":
        if train.min_lr_rate is not None:
            return {"min_lr_rate": train.min_lr_rate}
        return {"min_lr": train.min_lr}
    if train.lr_scheduler_type == "polynomial":
        return {"lr_end": polynomial_end_lr(train), "power": train.power or 1.0}
    return {}


def lr_factor(train: TrainSection, step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak LR after ``step`` scheduler steps (transformers' lambdas, verbatim math)."""
    name = train.lr_scheduler_type
    if name == "constant":
        return 1.0
    if name == "warmup_stable_decay":
        return _wsd_factor(train, step, warmup_steps, total_steps)
    if step < warmup_steps:
        # constant_with_warmup divides by max(1.0, n), the others by float(max(1, n)): the same value.
        return float(step) / float(max(1, warmup_steps))
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if name == "polynomial":
        lr_init, lr_end = train.learning_rate, polynomial_end_lr(train)
        if step > total_steps:
            return lr_end / lr_init
        pct_remaining = 1 - (step - warmup_steps) / (total_steps - warmup_steps)
        return ((lr_init - lr_end) * pct_remaining ** (train.power or 1.0) + lr_end) / lr_init
    # Our own decays (transformers has none): multiply by gamma per step, or per step_size steps.
    if name == "step":
        return train.gamma ** ((step - warmup_steps) // train.step_size)
    if name == "exponential":
        return train.gamma ** (step - warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    if name == "cosine":
        return max(0.0, factor)
    # cosine_with_min_lr
    rate = floor_rate(train)
    return max(0, factor * (1 - rate) + rate)


def _wsd_factor(train: TrainSection, step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers' warmup_stable_decay with linear warmup and cosine decay, both to the floor."""
    rate = floor_rate(train)
    decay_steps = count_decay_steps(train, total_steps)
    stable_steps = total_steps - warmup_steps - decay_steps
    if step < warmup_steps:
        # Unlike the other schedules, WSD's warmup starts at the floor, not at 0.
        progress = float(step) / float(max(1, warmup_steps))
        return max(0.0, progress * (1.0 - rate) + rate)
    if step < warmup_steps + stable_steps:
        return 1.0
    if step < warmup_steps + stable_steps + decay_steps:
        progress = float(step - warmup_steps - stable_steps) / float(max(1, decay_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        return max(0.0, factor * (1.0 - rate) + rate)
    return rate


def plan_schedule(num_examples: int, train: TrainSection, world_size: int = 1) -> SchedulePlan:
    """The whole schedule: step counts and the LR of every optimizer step, for ``world_size``
    processes training together (one per GPU)."""
    total = count_optimizer_steps(num_examples, train, world_size)
    warmup = count_warmup_steps(train, total)
    lrs = LearningRates(train, warmup, total)
    return SchedulePlan(
        scheduler=train.lr_scheduler_type,
        num_examples=num_examples,
        effective_batch_size=train.per_device_train_batch_size
        * train.gradient_accumulation_steps
        * world_size,
        steps_per_epoch=epoch_steps(num_examples, train, world_size),
        total_steps=total,
        warmup_steps=warmup,
        peak_lr=train.learning_rate,
        final_lr=lrs[-1],
        lrs=lrs,
        world_size=world_size,
        generations=train.method_options()["num_generations"] if train.grpo() else None,
    )


def describe_plan(plan: SchedulePlan) -> list[str]:
    """The preview's lines, as printed by `plan` and at the start of every run."""
    warmup_share = 100 * plan.warmup_steps / plan.total_steps
    per_step = f"{plan.num_examples} sequences, {plan.effective_batch_size} per step"
    if plan.generations:
        per_step = (
            f"{plan.num_examples} prompts, {plan.effective_batch_size // plan.generations} per step with "
            f"{plan.generations} completions each"
        )
    lines = [
        f"schedule: {plan.scheduler}, {plan.total_steps} optimizer steps "
        f"({per_step}, {plan.steps_per_epoch} steps per epoch"
        + (f", over {plan.world_size} processes" if plan.world_size > 1 else "")
        + ")",
        f"warmup: {plan.warmup_steps} step{'' if plan.warmup_steps == 1 else 's'} "
        f"({warmup_share:.1f}% of training), "
        f"from {plan.lrs[0]:.3g} to {plan.peak_lr:.3g}",
        f"learning rate: peak {plan.peak_lr:.3g}, last step {plan.final_lr:.3g}",
    ]
    marks = [
        f"{int(fraction * 100)}% (step {step}): {lr:.3g}"
        for fraction in MILESTONES
        for step, lr in [plan.lr_at_fraction(fraction)]
    ]
    lines.append("LR at " + ", ".join(marks))
    return lines


def plan_as_dict(plan: SchedulePlan) -> dict:
    """The plan for `plan --json`: the LR of every optimizer step up to FULL_LIST_STEPS of them (a
    sample of PLOT_POINTS beyond, as [step, lr] pairs)."""
    every = plan.total_steps <= FULL_LIST_STEPS
    return {
        "scheduler": plan.scheduler,
        "num_examples": plan.num_examples,
        "effective_batch_size": plan.effective_batch_size,
        "world_size": plan.world_size,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "peak_lr": plan.peak_lr,
        "final_lr": plan.final_lr,
        "milestones": [
            {"fraction": fraction, "step": step, "lr": lr}
            for fraction in MILESTONES
            for step, lr in [plan.lr_at_fraction(fraction)]
        ],
        "lr_per_step": list(plan.lrs) if every else None,
        "lr_sampled": None if every else [list(pair) for pair in plan.lrs.sampled()],
    }


# Peak learning rates practitioners use for LoRA/QLoRA adapters (QLoRA paper: 1e-4 to 2e-4 for 7B-65B;
# Unsloth's and axolotl's examples: 2e-4); an order of magnitude outside is almost always a typo.
LORA_LR_RANGE = (1e-5, 1e-3)
# Preference tuning moves an already good model: DPO's paper trains at 5e-7 (full weights), LoRA
# recipes (TRL's, Unsloth's, Zephyr's) at 5e-7 to 5e-5.
PREFERENCE_LR_RANGE = (1e-7, 1e-4)


def advise(plan: SchedulePlan, train: TrainSection) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the schedule, each a sentence that says how to fix it."""
    errors, warnings = [], []
    share = plan.warmup_steps / plan.total_steps
    if plan.warmup_steps >= plan.total_steps:
        errors.append(
            f"warmup ({plan.warmup_steps} steps) is as long as training ({plan.total_steps} steps), "
            "so the LR never reaches its peak; lower warmup_steps or use warmup_ratio: 0.03"
        )
    elif share > 0.5:
        warnings.append(
            f"warmup covers {share:.0%} of training ({plan.warmup_steps} of {plan.total_steps} steps); "
            "most of the run is spent below the peak LR: use warmup_ratio between 0.01 and 0.1"
        )
    elif plan.warmup_steps and not 0.01 <= share <= 0.2:
        warnings.append(
            f"warmup is {share:.1%} of training, outside the usual 1-20%; "
            "use warmup_ratio: 0.03 unless you have a reason"
        )
    if plan.warmup_steps == 0 and train.lr_scheduler_type != "constant" and train.learning_rate > 1e-4:
        warnings.append(
            f"no warmup at learning_rate {train.learning_rate:g}: Adam's first updates are the largest "
            "and can destabilise training; add warmup_ratio: 0.03"
        )
    # GRPO, like preference tuning, moves an already capable model: Unsloth's and TRL's LoRA GRPO
    # examples train at 5e-6 to 1e-5.
    moves_a_model = train.preference() or train.grpo()
    low, high = PREFERENCE_LR_RANGE if moves_a_model else LORA_LR_RANGE
    if not low <= train.learning_rate <= high:
        usual = f"{train.method_name()} with LoRA" if moves_a_model else "LoRA"
        start = "5e-6" if moves_a_model else "2e-4"
        warnings.append(
            f"learning_rate {train.learning_rate:g} is far outside the usual {usual} range "
            f"({low:g} to {high:g}); {start} is the common starting point"
        )
    after_warmup = plan.total_steps - plan.warmup_steps
    if train.lr_scheduler_type == "warmup_stable_decay":
        decay = count_decay_steps(train, plan.total_steps)
        if decay > after_warmup:
            errors.append(
                f"warmup ({plan.warmup_steps} steps) plus decay ({decay} steps, decay_ratio "
                f"{train.decay_ratio:g}) is longer than training ({plan.total_steps} steps), so the decay "
                "is cut short; lower decay_ratio or the warmup"
            )
    if train.lr_scheduler_type == "step" and 0 < after_warmup <= train.step_size:
        warnings.append(
            f"step_size {train.step_size} is not shorter than the {after_warmup} steps after warmup, "
            f"so the LR never decays; use a step_size below {after_warmup}"
        )
    zero_early = plan.lrs.first_zero_after_warmup()
    if zero_early:
        warnings.append(
            f"the LR reaches 0 at step {zero_early} of {plan.total_steps}, so the remaining steps learn "
            "nothing; shorten training or use cosine_with_min_lr"
        )
    return errors, warnings
