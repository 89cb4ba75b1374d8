"""The training stack, the one place torch, Unsloth, TRL and PEFT are imported: the engine
(stack.py, chosen by backend.py), load + LoRA + trainer + train (training.py), callbacks,
inference, GPU memory, the loss watch. It never imports export (but for the one crossing the
layering test names), evaluate, the lifecycle or the CLI."""
