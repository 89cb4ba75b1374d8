"""GRPO: TRL's GRPOTrainer (Unsloth's generated one on a GPU), rewarded by the recipe's rewards,
the first of them usually the task's own tests run confined (train/rewards.py).

The prompts arrive rendered and tokenized by data preparation (data/tasks.py: eval's prompt
through the run's chat template), so the trainer samples from exactly the tokens the audit showed:
its own tokenizing of the `prompt` column is replaced by ours of the same text, without adding a
second BOS. Generation is the backend's own generate (no vLLM). Every GRPO option is passed
explicitly (Unsloth's GPU trainer fills some differently when left unset).
"""

from __future__ import annotations

from finetune.train import stack  # noqa: F401  (first: Unsloth before the libraries it patches)

# isort: split
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler

from finetune.base import sandbox
from finetune.data.store import cache_files_elsewhere
from finetune.recipe.schema import Recipe
from finetune.train import rewards
from finetune.train.our_trainer import OurTrainer, TrainedAdapterOnly


def build_config(recipe: Recipe, arguments: dict, worst_case: bool = False) -> GRPOConfig:
    """``worst_case`` (the probe): every completion written to max_completion_length (the end of
    turn held back until then), the step the plan counts."""
    options = recipe.train.method_options()
    longest = {"min_new_tokens": options["max_completion_length"]} if worst_case else None
    return GRPOConfig(
        generation_kwargs=longest,
        **arguments,
        num_generations=options["num_generations"],
        max_completion_length=options["max_completion_length"],
        temperature=options["temperature"],
        top_p=options["top_p"],
        top_k=0,  # no top-k cut: top_p alone
        beta=options["beta"],
        loss_type=options["loss_type"],
        epsilon=options["epsilon"],
        epsilon_high=options["epsilon_high"] or options["epsilon"],
        scale_rewards=options["scale_rewards"],
        mask_truncated_completions=options["mask_truncated_completions"],
        num_iterations=options["num_iterations"],
        use_bias_correction_kl=True,  # the KL estimate weighted by the policy ratio (TRL 1.15's default)
        steps_per_generation=recipe.train.gradient_accumulation_steps,  # one generation a step
        reward_weights=[entry.weight for entry in recipe.reward_entries()],
        use_vllm=False,
        log_completions=False,
        remove_unused_columns=False,  # the rewards read the task column
        shuffle_dataset=True,
        include_num_input_tokens_seen="no",  # its batches are prompts, counted after generation
    )


def trainer_rows(dataset: Dataset | None) -> Dataset | None:
    """The prompt (the rendered text) and the task (JSON) of every kept task."""
    if dataset is None or not len(dataset):
        return None
    with cache_files_elsewhere():
        return dataset.select_columns(["prompt", "task", "source"])


class _Named:
    """A reward function under the name it is logged by (TRL reads __name__)."""

    def __init__(self, name: str):
        self.__name__ = name


class TestsReward(_Named):
    """The share of its task's tests each completion passes, run confined in one pool of workers
    kept for the whole run."""

    def __init__(self, name: str, chat: bool, limits: sandbox.Limits = rewards.DEFAULT_LIMITS):
        super().__init__(name)
        self.chat, self.limits = chat, limits
        self.pool = None

    def run(self, programs: list[str]) -> list[sandbox.Outcome]:
        if self.pool is None:
            sandbox.check_confinement()  # as the run's start checked: never unconfined unasked
            self.pool = sandbox.Pool(sandbox.default_workers(), self.limits)
        return self.pool.run(programs)

    def __call__(self, prompts, completions, task, **columns) -> list[float]:
        texts = [rewards.completion_text(c) for c in completions]
        return rewards.score_tests(rewards.tasks_of(task), texts, self.chat, self.run)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class FormatReward(_Named):
    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [rewards.format_score(rewards.completion_text(c)) for c in completions]


class LengthReward(_Named):
    def __init__(self, name: str, target: int, most: int):
        super().__init__(name)
        self.target, self.most = target, most

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        return [rewards.length_score(len(ids), self.target, self.most) for ids in completion_ids]


class _Renamed(_Named):
    def __init__(self, name: str, function):
        super().__init__(name)
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def reward_functions(recipe: Recipe, chat: bool) -> list:
    """The recipe's rewards as TRL's reward functions, in the order of their weights."""
    most = recipe.train.method_options()["max_completion_length"]
    functions = []
    for entry in recipe.reward_entries():
        name = entry.log_name()
        if entry.reward == "tests":
            functions.append(TestsReward(name, chat))
        elif entry.reward == "format":
            functions.append(FormatReward(name))
        elif entry.reward == "length":
            functions.append(LengthReward(name, entry.target_tokens or most // 2, most))
        else:  # logged under the name the recipe's check of duplicates used
            functions.append(_Renamed(name, rewards.user_reward(entry.reward)))
    return functions


class EpochSeededSampler(RepeatSampler):
    """TRL's RepeatSampler with each epoch's order drawn from seed + epoch. TRL's draws epoch after
    epoch from one generator, which a resume builds afresh: a run resumed in its second epoch
    would replay the first epoch's order, some tasks twice and others never. The epoch is read
    from the trainer's state when an epoch's pass begins (transformers' set_epoch does not reach a
    sampler under the batches a resume skips)."""

    def __iter__(self):
        if self.shuffle:
            epoch = int(self.trainer_state().epoch + 1e-9)  # k.0 at the start of epoch k, k.x mid-way
            self.generator.manual_seed((self.seed or 0) + epoch)
        return super().__iter__()


class PreparedGRPO(GRPOTrainer):
    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        seeded = EpochSeededSampler.__new__(EpochSeededSampler)
        seeded.__dict__.update(sampler.__dict__)  # TRL's arguments, as it built them
        seeded.trainer_state = lambda: self.state
        return seeded

    def _tokenize_prompts(self, prompts: list):
        # The prompt column holds the rendered prompt (its BOS in the text): tokenized as the data
        # preparation did, adding no special token.
        ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
        return ids, None, {}


class FinetuneGRPOTrainer(OurTrainer, TrainedAdapterOnly, PreparedGRPO):
    def close_rewards(self) -> None:
        for function in self.reward_funcs:
            if isinstance(function, TestsReward):
                function.close()
