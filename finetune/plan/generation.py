"""What GRPO costs beyond a training step: sampling the completions, and running their tests.

Pure functions of the recipe, the model's shape and the device; the budget (budget.py) adds them to
the training step's terms. Each counts the worst case of a step: every prompt of the generation
batch as long as the longest task's, every completion max_completion_length tokens long (a random
or stuck model writes until the limit; users report GRPO running out of memory after 100+ steps,
when completions first grow that long).

Read from the code, not yet measured on a GPU:
- TRL 1.15 generates one step's completions in one call (per_device_train_batch_size x
  gradient_accumulation_steps rows); without vLLM, through the model's own generate (Unsloth's
  fast decode on a GPU, which keeps per-layer key and value buffers sized to prompt +
  max_new_tokens; transformers' dynamic cache on the CPU, which grows to the same).
- The loss's log-probabilities are computed in chunks on both paths (Unsloth's chunked scorer on a
  GPU, its CPU fallback's chunked head on the CPU): no batch x completion x vocabulary logits.
- With beta > 0 the reference pass is the base model (the adapter switched off), without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.models.shapes import Shapes
from finetune.plan.constants import constant
from finetune.recipe.schema import Recipe


@dataclass(frozen=True)
class Rollout:
    """One optimizer step's generation, at its worst."""

    rows: int  # completions generated at once (one step's)
    prompt_tokens: int  # the longest prompt
    completion_tokens: int  # max_completion_length

    @property
    def sequence(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def rollout(recipe: Recipe, longest_prompt: int) -> Rollout:
    train = recipe.train
    rows = train.per_device_train_batch_size * train.gradient_accumulation_steps
    return Rollout(rows, longest_prompt, train.method_options()["max_completion_length"])


def kv_cache_bytes(shapes: Shapes, rows: int, tokens: int, dtype_bytes: int) -> float:
    """Keys and values of every layer for ``rows`` sequences of ``tokens``."""
    return 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * dtype_bytes * rows * tokens


def decode_step_bytes(shapes: Shapes, rows: int, dtype_bytes: int) -> float:
    """What one decoding step produces beside the cache: each row's hidden state through one layer
    (the layer's working set), and the next token's logits in float32."""
    h, f = shapes.hidden, shapes.intermediate
    return rows * (dtype_bytes * (6 * h + 4 * f) + 4 * shapes.vocab)


def chunked_logprob_bytes(shapes: Shapes, micro_rows: int, completion: int, dtype_bytes: int) -> float:
    """The loss's log-probabilities in chunks: one chunk of one row's completion logits (and its
    float32 softmax) at a time, and the float32 per-token log-probabilities of the micro-batch
    (the policy's, the old ones and the reference's)."""
    chunk = completion * shapes.vocab * (dtype_bytes + 4)
    return chunk + 3 * 4 * micro_rows * completion


def generation_seconds(
    shapes: Shapes, weights_bytes: float, bandwidth_gbs: float, run: Rollout, dtype_bytes: int
) -> float:
    """A step's sampling: each decoding step reads the weights once and the cache so far (memory
    bound at a batch this small), plus a fixed cost of launching a step's kernels from Python."""
    bandwidth = constant("bandwidth_efficiency") * bandwidth_gbs * 1e9
    mean_cache = kv_cache_bytes(shapes, run.rows, run.prompt_tokens + run.completion_tokens // 2, dtype_bytes)
    per_step = (weights_bytes + mean_cache) / bandwidth + constant("decode_step_overhead_s")
    return run.completion_tokens * per_step


def sandbox_seconds(rows: int, seconds_per_program: float, workers: int) -> float:
    """A step's completions run against their tests, ``workers`` at a time."""
    return rows * seconds_per_program / max(workers, 1)
