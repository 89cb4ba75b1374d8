"""A reward the tiny random model can raise within a short GRPO run (tests/e2e/test_grpo_run.py):
the share of a completion's tokens that are one token, the most common one of the first batch.
At temperature 0.3 the random model samples its top tokens often enough for the groups' rewards
to differ, and LoRA can raise one token's logit everywhere. Read by its import path, as a user's
own reward function is (rewards: - reward: tests.e2e.grpo_rewards:one_token)."""

from collections import Counter

TARGET: list[int] = []


def one_token(prompts, completions, completion_ids, **kwargs):
    if not TARGET:  # a resumed run picks it again from its first batch: the same token, seeded
        TARGET.append(Counter(t for ids in completion_ids for t in ids).most_common(1)[0][0])
    return [sum(t == TARGET[0] for t in ids) / max(len(ids), 1) for ids in completion_ids]
