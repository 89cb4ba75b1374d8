"""What the engine will actually run, decided once from the recipe and the device (pure; no torch).

A recipe asks for gradient checkpointing, an optimizer, packing; what runs can differ by backend
and device (Unsloth's offloaded checkpointing exists only on its backend, its CPU fallback has no
bitsandbytes optimizers and no FlashAttention for packing, TRL casts adapters to bf16 on a 4-bit
base). The planner (memory, time, disk, the data plan) and the trainer (SFTConfig, LoRA, the
optimizer) both read these functions, so a plan cannot describe another run than the one that
trains. Each decision says where in the libraries it comes from; the e2e tier checks them against
what the trainer built.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.recipe.schema import ModelSection, Recipe

# Padding-free batching (each micro-batch flattened into one row) stays off on every device: the
# memory plan counts padded micro-batches, and the trainer passes this to SFTConfig, never leaving
# it for Unsloth to switch on by itself (it does on some GPUs when the field is unset).
PADDING_FREE = False

# DoRA's magnitude vectors stay fp32: TRL's bf16 cast leaves them out (their updates can be smaller
# than bf16 resolves), and PEFT creates them in fp32.
MAGNITUDE_BYTES = 4


@dataclass(frozen=True)
class Engine:
    """The decisions for one recipe on one kind of device."""

    checkpointing: str  # "off", "standard" (recompute on the GPU), "unsloth" (offloaded to CPU memory)
    optimizer: str  # the optimizer that steps
    packing: bool  # whether data.packing takes effect
    packing_off: str | None  # why the recipe's packing does not run here, when it asks for it
    padding_free: bool
    adapter_bytes: int  # bytes per LoRA value as the trainer holds it (and its gradient and moments)


def engine_for(recipe: Recipe, on_gpu: bool) -> Engine:
    packing, packing_off = packing_runs(recipe, on_gpu)
    return Engine(
        checkpointing=checkpointing(recipe.model),
        optimizer=effective_optimizer(recipe.train.optim, on_gpu),
        packing=packing,
        packing_off=packing_off,
        padding_free=PADDING_FREE,
        adapter_bytes=adapter_bytes(recipe.model, on_gpu),
    )


def checkpointing(model: ModelSection) -> str:
    """The gradient checkpointing that runs: Unsloth's offloaded kind exists only on its backend,
    and is plain recomputation on the other."""
    offloaded = model.gradient_checkpointing == "unsloth" and model.backend != "unsloth"
    return "standard" if offloaded else model.gradient_checkpointing


def effective_optimizer(optim: str, on_gpu: bool) -> str:
    """Unsloth's CPU fallback replaces bitsandbytes' 8-bit and paged optimizers with fused AdamW
    (and the transformers backend does the same on the CPU, through train.stack.trainer_settings)."""
    return optim if on_gpu or not ("8bit" in optim or "paged" in optim) else "adamw_torch_fused"


def packing_runs(recipe: Recipe, on_gpu: bool) -> tuple[bool, str | None]:
    """Whether data.packing takes effect here, and why not when it does not. Packed rows must not
    attend to each other: Unsloth keeps them apart on a GPU and turns packing off on the CPU (its
    fallback has no FlashAttention); with plain transformers only FlashAttention's variable-length
    kernels would, and it is not installed (SDPA would let the rows see each other)."""
    if not recipe.data.packing:
        return False, None
    if recipe.model.backend != "unsloth":
        return False, (
            "packing is off on the transformers backend: without FlashAttention packed rows would see "
            "each other"
        )
    if not on_gpu:
        return False, "packing is off on the CPU: Unsloth needs FlashAttention to keep packed rows apart"
    return True, None


def adapter_bytes(model: ModelSection, on_gpu: bool) -> int:
    """Bytes per LoRA A and B value as the trainer holds them, and so their gradients and AdamW's
    moments. PEFT creates them in fp32; TRL's own SFTTrainer casts them to bf16 on a 4-bit base
    (trl/trainer/sft_trainer.py, "When using QLoRA"), and TRL's own trainer is the one that trains
    on the transformers backend, and in Unsloth's CPU fallback (unsloth_zoo/cpu/trainer.py
    subclasses it). Unsloth's GPU trainer, generated from TRL's source, leaves the cast out
    (unsloth/models/rl.py turns `if _is_quantized_model:` into `if False:`). Checked against the
    trained model on the CPU (tests/e2e/test_train.py and test_lora_variants.py on Unsloth's
    backend, test_transformers_backend.py) and on a GPU (tests/e2e/test_gpu.py)."""
    trl_casts = model.load_in_4bit and (model.backend == "transformers" or not on_gpu)
    return 2 if trl_casts else 4


@dataclass(frozen=True)
class Passes:
    """What one row costs a training step, by method (TRL 1.15's trainers): ``sequences`` trained
    (chosen and rejected for a pair, padded alike to the longer), ``forwards`` more passes without
    gradients over the trained sequences' tokens (the reference; for KTO also the KL completions,
    through the model and the reference), ``logits``: whether TRL's loss makes the T x V logits
    (ORPO's and CPO's concatenated_forward; Unsloth rewrites it on a GPU, see loss_memory), and
    ``reference_adapter``: DPOTrainer and KTOTrainer, handed a PEFT model, add a frozen copy of its
    adapter ("ref", fp32: PEFT's add_adapter) as the reference, the base itself for a new adapter
    (B = 0)."""

    sequences: int
    forwards: int
    logits: bool
    what: str  # said in the plan
    reference_adapter: bool = False  # DPO and KTO keep a frozen fp32 copy of the adapter as the reference


def row_passes(recipe: Recipe) -> Passes:
    method = recipe.train.method_name()
    if method == "dpo":
        return Passes(2, 1, False, "each pair is 2 sequences (chosen, rejected) and a reference pass", True)
    if method in ("orpo", "simpo"):
        return Passes(2, 0, True, "each pair is 2 sequences (chosen, rejected), no reference")
    if method == "kto":
        kl = recipe.train.method_options()["loss_type"] == "kto"  # apo_zero_unpaired needs no KL term
        return Passes(
            1,
            3 if kl else 1,
            False,
            "each row is 1 sequence, a reference pass" + (" and the KL completions (2 passes)" if kl else ""),
            True,
        )
    if method == "grpo":
        options = recipe.train.method_options()
        beta = options["beta"] > 0
        # With num_iterations > 1 TRL keeps the sampling policy's log-probabilities: one more
        # pass without gradients over each generated batch (as the reference's is).
        old = options["num_iterations"] > 1
        what = (
            "each completion is 1 sequence (the longest prompt + "
            f"{options['max_completion_length']} tokens), "
            f"sampled {options['num_generations']} per prompt"
            + (", and a reference pass (beta > 0)" if beta else "")
            + (", and the sampling policy's log-probabilities (num_iterations > 1)" if old else "")
        )
        # TRL's CPU trainer keeps a frozen "ref" copy of a handed PEFT model's adapter when beta > 0
        # (Unsloth's GPU trainer uses the base instead): counted, it is small.
        return Passes(1, int(beta) + int(old), False, what, beta)
    return Passes(1, 0, False, "")
