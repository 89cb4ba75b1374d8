"""Did the model get better at code: HumanEval and task files scored by pass@k (evaluation.py),
and the sandbox that runs model-written code (sandbox.py). It never imports export, the lifecycle
or the CLI."""
