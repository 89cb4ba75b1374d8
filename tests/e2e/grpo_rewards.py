"""A reward the tiny random model can raise within a short GRPO run (tests/e2e/test_grpo_run.py):
the share of a completion's tokens that are one token, the most common one of the run's first
batch. At temperature 0.3 the random model samples its top tokens often enough for the groups'
rewards to differ, and LoRA can raise one token's logit everywhere. Read by its import path, as a
user's own reward function is (rewards: - reward: tests.e2e.grpo_rewards:one_token)."""

import json
from collections import Counter
from pathlib import Path


def one_token(prompts, completions, completion_ids, task, log_metric, **kwargs):
    # Each completion arrives with its own task (TRL repeats the dataset's columns): its prompt
    # holds the task's function.
    for prompt, entry in zip(prompts, task, strict=True):
        assert json.loads(entry)["prompt"].strip() in prompt, "a completion came with another task"
    # The token is kept in the run folder (log_metric is the trainer's bound method: its output
    # directory is the run's checkpoints/), so a resumed run rewards the token its first batch chose.
    chosen = Path(log_metric.__self__.args.output_dir).parent / "one_token.txt"
    if not chosen.is_file():
        chosen.write_text(str(Counter(t for ids in completion_ids for t in ids).most_common(1)[0][0]))
    target = int(chosen.read_text())
    return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]
