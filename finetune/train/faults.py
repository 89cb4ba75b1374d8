"""The tests' injected faults: FINETUNE_INJECT_FAULT=KIND@N makes training step N fail as a real
fault would, so the runner's handling of it (the out-of-memory report, the divergence stop, a
torchrun peer dying) is tested end to end on a CPU.

Loaded only when the variable is set (training.build_trainer): a run without it never imports this
module, and its trainer is FinetuneTrainer itself.

KIND: oom (out of memory in the forward and backward pass), cublas (the same as cuBLAS reports it),
oom-optimizer (out of memory where the optimizer's step begins), oom-eval (out of memory in the
evaluation after step N), nan (every loss from step N on is NaN). KIND@N:R injects it on torchrun
rank R alone; oom@probe injects it in the probe's first step.
(FINETUNE_INJECT_FAULT=gguf-convert, a failing GGUF converter, is read in that converter's own
process: export/gguf_export.py.)
"""

from __future__ import annotations

import finetune.train.stack  # noqa: F401  (first: Unsloth, set up, before the libraries it patches)

# isort: split
import os

import torch
from transformers import TrainerCallback

from finetune.base import distributed

FAULTS = ("oom", "cublas", "oom-optimizer", "oom-eval", "nan")


def injected_fault(for_probe: bool) -> tuple[str, int] | None:
    """The fault FINETUNE_INJECT_FAULT asks of this process's trainer (the probe's when
    ``for_probe``), as (KIND, step)."""
    fault, _, on_rank = os.environ.get("FINETUNE_INJECT_FAULT", "").partition(":")
    kind, _, step = fault.partition("@") if on_rank in ("", str(distributed.rank())) else ("", "", "")
    if step == "probe":
        return (kind, 1) if for_probe and kind == "oom" else None
    return (kind, int(step)) if kind in FAULTS and step.isdigit() and not for_probe else None


def with_faults(trainer_class: type, for_probe: bool) -> type:
    """``trainer_class`` failing as FINETUNE_INJECT_FAULT says (a subclass: the real trainer runs
    every step the fault does not stop)."""
    fault = injected_fault(for_probe)

    class FaultyTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # In the forward pass of a training step (not an evaluation), where a real one strikes.
            step = self.state.global_step + 1
            if self.in_evaluation and fault == ("oom-eval", self.state.global_step):
                raise torch.OutOfMemoryError(
                    f"injected out-of-memory fault in the evaluation after step {step - 1}"
                )
            if self.in_forward_backward and fault == ("oom", step):
                raise torch.OutOfMemoryError(f"injected out-of-memory fault at step {step}")
            if self.in_forward_backward and fault == ("cublas", step):
                raise RuntimeError(
                    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step = self.state.global_step + 1
            if fault == ("oom-optimizer", step) and self.accelerator.sync_gradients:
                self.add_callback(OutOfMemoryInOptimizerStep())
            if fault is not None and fault[0] == "nan" and step >= fault[1]:
                loss = loss * float("nan")
            return loss

    return FaultyTrainer


class OutOfMemoryInOptimizerStep(TrainerCallback):
    """The oom-optimizer fault: raised where the optimizer's step begins."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError(
            f"injected out-of-memory fault in the optimizer step {state.global_step + 1}"
        )
