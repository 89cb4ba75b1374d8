"""Did the model get better at code: HumanEval and task files scored by pass@k (evaluation.py),
each answer run in the sandbox (base/sandbox.py, which GRPO's tests reward shares). It never imports
export, the lifecycle or the CLI."""
