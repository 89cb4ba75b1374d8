"""The lm_head-and-loss term of the memory plan, as each backend's loss code allocates it: pure
Python, no torch. Neither engine makes the T x V logits on a GPU; each computes the loss in tiles.
tests/e2e/test_against_the_libraries.py holds the sizes below to the installed sources.
"""

from __future__ import annotations

# Unsloth's fused linear cross-entropy (unsloth_zoo/fused_losses/fused_linear.py, `_ce_impl`), which
# its Llama forward calls in training instead of making logits (unsloth/models/llama.py,
# CausalLM_fast_forward): lm_head and the loss in row chunks, never T x V logits. Its two layouts
# (tests/e2e/test_against_the_libraries.py holds these to the installed source):
FLASH_ROWS = 4096  # `_BWD_ROWS`: rows of the tiled pass, with an fp32 block of at most
FLASH_BLOCK_BYTES = 256 * 2**20  # `_BWD_TILE_BYTES` (16384 vocabulary columns at 4096 rows)
CHUNK_ROWS = 512  # `fused_linear_rows` below 4096 labelled tokens on cards over 24.5 GiB: rows x V
CPU_CHUNK_ROWS = 130  # unsloth_zoo/cpu/ops.py: UNSLOTH_CPU_CE_CHUNK_ELEMENTS (16M) // V rows
LOSS_BYTES_PER_TOKEN = 40  # log-probs, logsumexp (fp32), indices, shifted labels (int64), mask


def logits_bytes(
    hidden: int, vocab: int, tokens: int, on_gpu: bool, dtype_bytes: int = 2, training: bool = True
) -> float:
    """Peak bytes of lm_head and the loss, as Unsloth's fused cross-entropy allocates them.

    It computes the gradient of the hidden states in the forward pass and keeps only that (T x H)
    for the backward, which allocates one more T x H while it is alive; each chunk's scratch is an
    fp32 block of rows x columns plus fp32 and compute-dtype copies of its rows' hidden states. On a
    GPU the larger of its two layouts (which one runs depends on the card's total memory and the
    labelled tokens), so this is an upper bound by at most a few hundred MiB. Without gradients (an
    evaluation: ``training`` false) it keeps no gradient of the hidden states
    (unsloth_zoo/fused_losses/cross_entropy_loss.py: compute_gradients = torch.is_grad_enabled()).
    """
    h, v = hidden, vocab
    per_row_hidden = (4 + dtype_bytes) * h
    if on_gpu:
        flash, chunked = min(FLASH_ROWS, tokens), min(CHUNK_ROWS, tokens)
        scratch = max(
            min(FLASH_BLOCK_BYTES, flash * 4 * v) + flash * per_row_hidden,
            chunked * (4 * v + per_row_hidden),
        )
        kept = 2 * tokens * h * dtype_bytes  # the hidden states' gradient, and the backward's copy
    else:
        scratch = min(CPU_CHUNK_ROWS, tokens) * 4 * v
        kept = tokens * h * dtype_bytes
    return scratch + (kept if training else 0) + LOSS_BYTES_PER_TOKEN * tokens


# TRL's fused LM head (trl/trainer/utils.py add_fused_lm_head, trl/kernels/chunked_logprob.py), which
# SFTTrainer's loss uses on the transformers backend: log-probabilities in tiles, never T x V logits.
TRL_TOKEN_CHUNK = 4096  # TOKEN_CHUNK_SIZE: rows of a tile
TRL_VOCAB_CHUNK = 32768  # _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns of a tile


def transformers_loss_bytes(
    hidden: int, vocab: int, tokens: int, on_gpu: bool, dtype_bytes: int = 2, training: bool = True
) -> float:
    """Peak bytes of the lm_head and the loss on the transformers backend.

    On a GPU, TRL's fused LM head: one tile of rows x 32768 columns in the compute dtype, the
    labelled rows' hidden states copied out and kept for the backward, whose fp32 gradient (and its
    cast back) the backward allocates. Its kernels are Triton's, GPU only, so on the CPU the loss is
    transformers' own (train.FinetuneTrainer.compute_loss): the T x V logits, their fp32 copy (none
    when fp32 already), cross-entropy's fp32 log-softmax kept for the backward, and its gradient.
    Without gradients (``training`` false) neither the backward's buffers nor the gradient exist.
    Read from the code, not yet measured on a GPU."""
    h, v = hidden, vocab
    if on_gpu:
        tile = min(TRL_TOKEN_CHUNK, tokens) * min(TRL_VOCAB_CHUNK, v) * dtype_bytes
        kept = 2 * dtype_bytes + 4 if training else dtype_bytes  # the copied rows; their gradient
        return tile + tokens * h * kept + LOSS_BYTES_PER_TOKEN * tokens
    per_logit = dtype_bytes + (4 if dtype_bytes < 4 else 0) + 4 + (4 if training else 0)
    return tokens * v * per_logit + LOSS_BYTES_PER_TOKEN * tokens


def loss_bytes(
    backend: str, hidden: int, vocab: int, tokens: int, on_gpu: bool, dtype_bytes: int, training: bool = True
) -> tuple[str, float]:
    """(the plan's name for the term, its peak bytes) for ``backend``'s loss on this device, in a
    training step or (``training`` false) an evaluation."""
    if backend == "unsloth":
        bytes_ = logits_bytes(hidden, vocab, tokens, on_gpu, dtype_bytes, training)
        return "lm_head and loss (fused, chunked)", bytes_
    name = "lm_head and loss (TRL's fused head)" if on_gpu else "logits and loss (transformers)"
    return name, transformers_loss_bytes(hidden, vocab, tokens, on_gpu, dtype_bytes, training)


def preference_loss_bytes(
    logits: bool,
    backend: str,
    hidden: int,
    vocab: int,
    tokens: int,
    on_gpu: bool,
    dtype_bytes: int,
    training: bool = True,
) -> tuple[str, float]:
    """The lm_head-and-loss term of preference tuning (TRL's trainers call the model themselves).
    With Unsloth, its fused linear kernel serves them all: DPO's and KTO's ``fused_lm_head=True``
    (PatchFastRL swaps TRL's _ChunkedLogProbFunction for it, unsloth/models/rl.py) and, on a GPU,
    ORPO's and CPO's concatenated_forward (rewritten to score hidden states in row chunks,
    unsloth/models/rl_replacements.py), in logits_bytes' layout. Without Unsloth (or ORPO/CPO on
    its CPU path, ``logits``), TRL's own: DPO and KTO the fused head's tiles; ORPO and CPO the T x V
    logits and their fp32 log-softmax. Read from the code; not yet measured on a GPU."""
    if backend == "unsloth" and (on_gpu or not logits):
        return "lm_head and loss (fused, chunked)", logits_bytes(
            hidden, vocab, tokens, on_gpu, dtype_bytes, training
        )
    if logits:
        return "logits and loss (T x V: ORPO, CPO)", transformers_loss_bytes(
            hidden, vocab, tokens, False, dtype_bytes, training
        )
    return "lm_head and loss (TRL's fused head)", transformers_loss_bytes(
        hidden, vocab, tokens, True, dtype_bytes, training
    )
