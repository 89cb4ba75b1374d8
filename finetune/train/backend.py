"""Which training engine this process runs (recipe.model.backend), chosen before the heavy stack is
first imported (light: importing this imports nothing heavy; inference_stack does, when called)."""

from __future__ import annotations

import os
import sys

from finetune.base.errors import UserError
from finetune.recipe.schema import Recipe


def use_backend(backend: str) -> None:
    """Choose this process's training engine (recipe.model.backend) before the training stack is
    first imported; once it is, the engine is fixed (Unsloth patches libraries process-wide)."""
    loaded = sys.modules.get("finetune.train.stack")
    if loaded is None:
        os.environ["FINETUNE_BACKEND"] = backend
    elif loaded.BACKEND != backend:
        raise UserError(
            f"model.backend: {backend}: this process already runs the {loaded.BACKEND} backend; "
            "start the run in a process of its own"
        )


def inference_stack(recipe: Recipe):
    """finetune.train.inference on the backend ``recipe`` trained with (heavy)."""
    use_backend(recipe.model.backend)
    from finetune.train import inference

    return inference
