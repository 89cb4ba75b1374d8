"""The training stack, the one place torch, Unsloth, TRL and PEFT are imported: the engine
(stack.py, chosen by backend.py), load + LoRA + trainer + train (training.py), callbacks,
inference, GPU memory, the loss watch, GRPO's trainer (grpo.py) and its rewards (rewards.py, pure:
the tests run confined in base/sandbox.py). It never imports export (but for the one crossing the
layering test names), evaluate, the lifecycle or the CLI."""
