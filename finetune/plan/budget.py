"""Memory and step-time predictions from a model's config.json and the recipe: pure Python, no torch.

Every term is a plain function of the shapes, so each can be checked on its own: the static terms
(weights, quantization constants, LoRA parameters, gradients, optimizer state) exactly against
instantiated models, the dynamic ones (activations, logits, overheads, speed) against measurements
on a GPU. The numbers that measurement sets live in ``CONSTANTS``, each with where it comes from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from finetune.data.tokenize import count_packed_sequences
from finetune.models.shapes import (
    Shapes,
    lora_tensor_sizes,
    nf4_bytes,
    nf4_bytes_single_quant,
    targeted_projections,
)
from finetune.plan import constants, generation
from finetune.plan.constants import GIB, constant
from finetune.plan.devices import GPUS, Device
from finetune.plan.engine import (
    MAGNITUDE_BYTES,
    adapter_bytes,
    checkpointing,
    effective_optimizer,
    row_passes,
)
from finetune.plan.loss_memory import loss_bytes, preference_loss_bytes
from finetune.plan.multi_gpu import allreduce_seconds, link
from finetune.plan.schedule import count_optimizer_steps
from finetune.recipe.schema import Recipe


def trainable_tensors(shapes: Shapes, lora, model, on_gpu: bool) -> list[tuple[list[int], int]]:
    """The trainable tensors' sizes (``lora``: the recipe's section), grouped by the bytes per value
    the trainer holds them in: LoRA's A and B (adapter_bytes), and DoRA's magnitudes."""
    groups = [(lora_tensor_sizes(shapes, lora.r, lora.target_modules), adapter_bytes(model, on_gpu))]
    if lora.use_dora:
        magnitudes = [o for _, o in targeted_projections(shapes, lora.target_modules)] * shapes.layers
        groups.append((magnitudes, MAGNITUDE_BYTES))
    return groups


def reference_adapter(recipe: Recipe, shapes: Shapes) -> dict[str, int]:
    """DPO's and KTO's frozen copy of the adapter, their reference (engine.Passes), in fp32."""
    if not row_passes(recipe).reference_adapter:
        return {}
    values = sum(lora_tensor_sizes(shapes, recipe.lora.r, recipe.lora.target_modules))
    return {"reference adapter (a frozen fp32 copy)": 4 * values}


def trainable_bytes(groups: list[tuple[list[int], int]]) -> int:
    """Bytes of the trainable tensors (trainable_tensors), and so of their gradients."""
    return sum(sum(sizes) * size for sizes, size in groups)


# bitsandbytes' 8-bit optimizers keep 32-bit state for tensors smaller than this (min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCKSIZE = 256  # one fp32 absmax per block of 8-bit state, for each of the two moments


def optimizer_state_bytes(optim: str, tensor_sizes: list[int], adapter_bytes: int) -> int:
    """Optimizer state of the trainable tensors: AdamW keeps two moments in the parameters' dtype;
    bitsandbytes' 8-bit AdamW one byte each plus an fp32 absmax per 256 values each, and two fp32
    moments for a tensor below min_8bit_size (bitsandbytes/optim/optimizer.py, init_state)."""
    if "8bit" not in optim:
        return sum(2 * adapter_bytes * n for n in tensor_sizes)
    total = 0
    for n in tensor_sizes:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)
    return total


# ---- Memory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    terms: dict[str, float]  # name -> bytes, in the order printed
    tokens_per_micro_batch: int
    # The 4-bit weights as they would be without double quantization (None for a 16-bit base).
    single_quant_weights: float | None = None

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def upper(self) -> float:
        return self.total * (1 + constant("memory_margin"))

    @property
    def paged(self) -> float:
        """Bytes in CUDA unified memory (a paged optimizer's state): the driver can move them to the
        host under pressure, and torch.cuda.max_memory_reserved never counts them."""
        return sum(v for k, v in self.terms.items() if k.startswith("optimizer state (paged"))


def weight_bytes(shapes: Shapes, load_in_4bit: bool, dtype_bytes: int) -> tuple[float, float]:
    """(quantized linear weights, weights kept in the compute dtype: embeddings, lm_head, norms)."""
    if load_in_4bit:
        linear = shapes.layers * sum(nf4_bytes(i * o) for i, o in shapes.projections().values())
    else:
        linear = shapes.linear_parameters * dtype_bytes
    return linear, (shapes.embedding_parameters + shapes.norm_parameters) * dtype_bytes


def activation_bytes_per_token(shapes: Shapes, checkpointing: str, dtype_bytes: int) -> float:
    """Activations kept for the backward pass, per token (after Korthikanti et al., arXiv:2205.05198,
    for Llama's SwiGLU MLP and grouped KV heads).

    One layer's working set: its two norm inputs and outputs, Q and the attention output, K and V,
    and the MLP's gate, up, SiLU(gate) and product. Without checkpointing every layer keeps it; with
    checkpointing only each layer's input is kept (on the GPU for 'standard', in CPU memory for
    Unsloth's offloaded mode) plus one layer being recomputed.
    """
    h, kv, f = shapes.hidden, shapes.kv_heads * shapes.head_dim, shapes.intermediate
    per_layer = dtype_bytes * (6 * h + 2 * kv + 4 * f)
    if checkpointing == "off":
        return shapes.layers * per_layer
    if checkpointing == "standard":
        return shapes.layers * dtype_bytes * h + per_layer
    return per_layer + dtype_bytes * h  # unsloth: checkpoints offloaded; one input buffer stays


def dora_activation_bytes_per_token(
    shapes: Shapes, target_modules: list[str], checkpointing: str, dtype_bytes: int
) -> float:
    """What DoRA keeps for the backward pass besides LoRA's, per token: PEFT's DoraLinearLayer
    scales the base output and the LoRA output by the magnitude (two products, each saving an
    out-features tensor). Checkpointing keeps them for the one layer being recomputed only."""
    per_layer = 2 * dtype_bytes * sum(o for _, o in targeted_projections(shapes, target_modules))
    return per_layer * (shapes.layers if checkpointing == "off" else 1)


def dora_workspace_bytes(shapes: Shapes, target_modules: list[str], adapter: int, dtype_bytes: int) -> float:
    """DoRA's transient peak in one projection's forward (PEFT's dora.py): B @ A built by passing an
    in x in identity through the adapter (in the adapters' dtype), the base weight dequantized, and
    W + s * B @ A for the weight norm, all dense; the largest projection sets it."""
    return max(
        i * i * adapter + i * o * (adapter + 3 * dtype_bytes)
        for i, o in targeted_projections(shapes, target_modules)
    )


def predict_memory(
    recipe: Recipe,
    shapes: Shapes,
    tokens_per_micro_batch: int,
    dtype_bytes: int = 2,
    on_gpu: bool = True,
    world_size: int = 1,
) -> MemoryPlan:
    """Peak memory of one training step on one GPU (of ``world_size``), term by term."""
    optim = effective_optimizer(recipe.train.optim, on_gpu)
    linear, kept = weight_bytes(shapes, recipe.model.load_in_4bit, dtype_bytes)
    lora = recipe.lora
    groups = trainable_tensors(shapes, lora, recipe.model, on_gpu)
    trainable = trainable_bytes(groups)
    adapter = adapter_bytes(recipe.model, on_gpu)
    terms = {
        "4-bit base weights" if recipe.model.load_in_4bit else "base weights": linear,
        "embeddings, lm_head, norms": kept,
        "LoRA parameters": trainable,
        "LoRA gradients": trainable,
        **reference_adapter(recipe, shapes),
        f"optimizer state ({optim})": sum(optimizer_state_bytes(optim, s, n) for s, n in groups),
        f"activations ({checkpointing(recipe.model)} checkpointing)": tokens_per_micro_batch
        * activation_bytes_per_token(shapes, checkpointing(recipe.model), dtype_bytes),
    }
    if lora.use_dora:
        terms["DoRA activations"] = tokens_per_micro_batch * dora_activation_bytes_per_token(
            shapes, lora.target_modules, checkpointing(recipe.model), dtype_bytes
        )
        terms["DoRA weight-norm workspace"] = dora_workspace_bytes(
            shapes, lora.target_modules, adapter, dtype_bytes
        )
    name, loss = loss_term(recipe, shapes, tokens_per_micro_batch, on_gpu, dtype_bytes)
    terms[name] = loss
    if recipe.train.grpo():  # the step's sampling, counted on top of the training pass's buffers
        run = generation.rollout(
            recipe,
            tokens_per_micro_batch // recipe.train.per_device_train_batch_size
            - recipe.train.method_options()["max_completion_length"],
        )
        terms[f"generation key/value cache ({run.rows} completions x {run.sequence} tokens)"] = (
            generation.kv_cache_bytes(shapes, run.rows, run.sequence, dtype_bytes)
        )
        terms["generation decoding step"] = generation.decode_step_bytes(shapes, run.rows, dtype_bytes)
    if world_size > 1:  # DDP's flat buckets: the gradients once more (see multi_gpu.py)
        terms["DDP gradient buckets"] = trainable
    allocated = sum(terms.values())
    if on_gpu:  # PyTorch's CUDA caching allocator and the CUDA context; a CPU run has neither
        terms["allocator overhead"] = allocated * constant("allocator_overhead")
        terms["CUDA context"] = constant("cuda_context_bytes")
    single = None
    if recipe.model.load_in_4bit:
        single = shapes.layers * sum(nf4_bytes_single_quant(i * o) for i, o in shapes.projections().values())
    return MemoryPlan(terms, tokens_per_micro_batch, single)


def loss_term(
    recipe: Recipe, shapes: Shapes, tokens: int, on_gpu: bool, dtype_bytes: int, training: bool = True
) -> tuple[str, float]:
    """The lm_head-and-loss term: the backend's loss for SFT, the method's trainer's otherwise."""
    if recipe.train.grpo():
        completion = recipe.train.method_options()["max_completion_length"]
        rows = recipe.train.per_device_train_batch_size
        return "log-probabilities (chunked)", generation.chunked_logprob_bytes(
            shapes, rows, completion, dtype_bytes
        )
    if recipe.train.preference():
        return preference_loss_bytes(
            row_passes(recipe).logits,
            recipe.model.backend,
            shapes.hidden,
            shapes.vocab,
            tokens,
            on_gpu,
            dtype_bytes,
            training,
        )
    return loss_bytes(
        recipe.model.backend, shapes.hidden, shapes.vocab, tokens, on_gpu, dtype_bytes, training
    )


# What stays on the GPU from training while an evaluation runs: the weights, LoRA's parameters, the
# optimizer's state and DDP's buckets (the gradients are freed after each optimizer step: the
# trainer's model.zero_grad() sets them to None), and DoRA's weight norms, recomputed in every forward.
KEPT_DURING_EVAL = (
    "reference adapter",
    "4-bit base weights",
    "base weights",
    "embeddings, lm_head, norms",
    "LoRA parameters",
    "optimizer state",
    "DDP gradient buckets",
    "DoRA weight-norm workspace",
)


def predict_eval_memory(
    recipe: Recipe,
    shapes: Shapes,
    tokens_per_batch: int,
    dtype_bytes: int = 2,
    on_gpu: bool = True,
    world_size: int = 1,
) -> MemoryPlan:
    """Peak memory of one eval batch in the middle of training, term by term.

    Without gradients each layer's activations are freed once the next layer has them: one layer's
    working set at a time. No layer keeps its keys and values: Unsloth's trainer turns the model's
    cache off for training (unsloth/models/rl.py's prepare_for_training_mode calls for_training,
    which disables use_cache, and evaluate() does not turn it back on), and TRL passes
    use_cache=False on the transformers backend. The labels are passed, so the loss is the training
    step's code without its gradient; prediction_loss_only keeps the trainer from gathering logits
    across batches. Read from the code, not yet measured on a GPU."""
    train_terms = predict_memory(recipe, shapes, tokens_per_batch, dtype_bytes, on_gpu, world_size).terms
    terms = {k: v for k, v in train_terms.items() if k.startswith(KEPT_DURING_EVAL)}
    h, kv, f = shapes.hidden, shapes.kv_heads * shapes.head_dim, shapes.intermediate
    terms["eval activations (one layer at a time)"] = (
        tokens_per_batch * dtype_bytes * (6 * h + 2 * kv + 4 * f)
    )
    name, loss = loss_term(recipe, shapes, tokens_per_batch, on_gpu, dtype_bytes, training=False)
    terms[name] = loss
    allocated = sum(terms.values())
    if on_gpu:
        terms["allocator overhead"] = allocated * constant("allocator_overhead")
        terms["CUDA context"] = constant("cuda_context_bytes")
    return MemoryPlan(terms, tokens_per_batch)


# ---- Tokens per micro-batch ----------------------------------------------------------------------


def peak_tokens_per_micro_batch(
    lengths: list[int] | None, batch: int, max_seq_length: int, packing: bool
) -> int:
    """Tokens in the largest micro-batch: rows are padded to the longest of their batch, so the worst
    batch holds the longest row; packed sequences and unknown lengths count as full max_seq_length."""
    if packing or not lengths:
        return batch * max_seq_length
    return batch * min(max(lengths), max_seq_length)


def mean_tokens_per_micro_batch(
    lengths: list[int] | None, sequences: int, batch: int, max_seq_length: int, packing: bool
) -> float:
    """Average tokens per micro-batch over an epoch. Padded batches: seeded sampling of shuffled
    batches (pure and repeatable); packed ones carry no padding, so the real tokens per sequence."""
    if not lengths:
        return batch * max_seq_length
    if packing:
        return min(batch, sequences) * sum(lengths) / sequences
    rng = random.Random(0)
    size = min(batch, len(lengths))
    draws = [max(rng.sample(lengths, size)) for _ in range(400)]
    return size * sum(draws) / len(draws)


# ---- Time -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimePlan:
    step_seconds: float
    total_seconds: float
    flops_per_token: float
    terms: dict[str, float]  # seconds per micro-batch, by cause
    allreduce_seconds: float = 0.0  # per optimizer step, with several GPUs (multi_gpu.py)
    link: str = ""  # what the gradients cross
    eval_seconds: float = 0.0  # one evaluation (forward passes over the eval rows)
    evaluations: int = 0  # in the run; total_seconds counts them
    eval_every: int | None = None  # optimizer steps between them


def flops_per_token(shapes: Shapes, seq_len: float, checkpointing: str) -> float:
    """Hardware FLOPs per token of LoRA on a frozen base: forward 2N and input-gradient 2N for every
    linear layer and the lm_head (no weight gradients), attention 12 L h s (halved: causal), and one
    more forward of the layers under gradient checkpointing."""
    linear = shapes.linear_parameters
    head = shapes.vocab * shapes.hidden
    attention = 12 * shapes.layers * shapes.heads * shapes.head_dim * seq_len / 2
    flops = 4 * (linear + head) + attention
    if checkpointing != "off":
        flops += 2 * linear + attention / 3  # recomputed forward: 2N plus the attention forward
    return flops


def predict_time(
    recipe: Recipe, shapes: Shapes, device: Device, mean_tokens: float, total_steps: int, world_size: int = 1
) -> TimePlan:
    train, model = recipe.train, recipe.model
    each = row_passes(recipe)
    seq_len = mean_tokens / (train.per_device_train_batch_size * each.sequences)
    per_token = flops_per_token(shapes, seq_len, checkpointing(model))
    compute = mean_tokens * per_token / (constant("gemm_efficiency") * device.bf16_tflops * 1e12)
    passes = 3 if checkpointing(model) != "off" else 2
    dequant = 0.0
    if model.load_in_4bit:  # each pass dequantizes every weight: read 0.5 B + absmax, write 2 B
        traffic = passes * 2.5 * shapes.linear_parameters
        dequant = traffic / (constant("bandwidth_efficiency") * device.bandwidth_gbs * 1e9)
    overhead = constant("micro_batch_overhead_s")
    terms = {"matmuls": compute, "4-bit dequantization": dequant, "fixed overhead": overhead}
    if each.forwards:  # the reference (and KTO's KL) passes, without gradients
        terms["reference passes (no gradient)"] = forward_seconds(
            recipe, shapes, device, mean_tokens * each.forwards, seq_len, each.forwards
        )
    if recipe.lora.use_dora:
        terms["DoRA weight norms"] = passes * dora_seconds_per_pass(shapes, recipe.lora, device, model)
    if train.grpo():  # the step's sampling, a share per micro-batch
        run = generation.rollout(recipe, int(seq_len) - train.method_options()["max_completion_length"])
        weights = sum(weight_bytes(shapes, model.load_in_4bit, 2))
        terms["sampling the completions"] = (
            generation.generation_seconds(shapes, weights, device.bandwidth_gbs, run, 2)
            + forward_seconds(recipe, shapes, device, run.rows * run.prompt_tokens, run.prompt_tokens, 1)
        ) / train.gradient_accumulation_steps
    if model.backend == "transformers" and device.is_gpu:  # without Unsloth's fused GPU kernels
        terms["without Unsloth's kernels"] = (compute + dequant) * (constant("transformers_slowdown") - 1)
    step = train.gradient_accumulation_steps * sum(terms.values())
    allreduce, link_name = 0.0, ""
    if world_size > 1:  # once per optimizer step, after the last micro-batch's backward
        gradients = trainable_bytes(trainable_tensors(shapes, recipe.lora, model, device.is_gpu))
        bandwidth, link_name = link(device.name)
        allreduce = allreduce_seconds(gradients, world_size, bandwidth)
        step += allreduce
    return TimePlan(step, step * total_steps, per_token, terms, allreduce, link_name)


def dora_seconds_per_pass(shapes: Shapes, lora, device: Device, model) -> float:
    """DoRA's extra work in one pass over the layers, independent of the tokens: every targeted
    projection builds B @ A through an identity matrix (2 i^2 r + 2 i r o FLOPs) and writes and
    reads the dense tensors of dora_workspace_bytes once each (memory-bound)."""
    adapter = adapter_bytes(model, device.is_gpu)
    targeted = targeted_projections(shapes, lora.target_modules)
    flops = shapes.layers * sum(2 * i * i * lora.r + 2 * i * lora.r * o for i, o in targeted)
    traffic = 2 * shapes.layers * sum(i * i * adapter + i * o * (adapter + 3 * 2) for i, o in targeted)
    return flops / (constant("gemm_efficiency") * device.bf16_tflops * 1e12) + traffic / (
        constant("bandwidth_efficiency") * device.bandwidth_gbs * 1e9
    )


# ---- The gate -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    what: str
    predicted: float
    limit: float
    unit: str
    limit_is: str = "limit"  # what the limit is: "limit", or "free" for a disk's free space

    @property
    def ok(self) -> bool:
        return self.predicted <= self.limit

    def line(self) -> str:
        mark = "PASS" if self.ok else "FAIL"
        return (
            f"{mark} {self.what}: {self.predicted:.2f} {self.unit} "
            f"({self.limit_is} {self.limit:.2f} {self.unit})"
        )


@dataclass(frozen=True)
class BudgetPlan:
    device: Device
    memory: MemoryPlan
    time: TimePlan
    verdicts: list[Verdict]
    backend: str = "unsloth"  # the engine the plan is for (recipe.model.backend)
    world_size: int = 1  # GPUs training together; memory is per GPU
    eval_memory: MemoryPlan | None = None  # an eval batch's peak, when the run evaluates
    counted: str = ""  # what a preference method's rows cost, as counted (engine.Passes.what)
    sampling: str = ""  # GRPO: how completions are generated and their tests run

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    @property
    def memory_fits(self) -> bool:
        """The first verdict: the peak against the card's memory."""
        return self.verdicts[0].ok

    @property
    def time_predicted(self) -> bool:
        """Whether the step time is a prediction: on a GPU. The speed model is a GPU's (matmuls and
        memory-bound kernels at a card's throughput); a CPU step of the tiny model is mostly fixed
        overhead and follows the machine's load (the same plan measured 0.65 to 3.9 s a step here,
        against 0.65 to 11.7 s "predicted"), so on a CPU the run measures it and nothing is promised."""
        return self.device.is_gpu


# What `plan` says instead of a CPU's step time, and why.
CPU_TIME = (
    "time: not predicted on a CPU (the speed model describes GPUs; a CPU step is mostly overhead and "
    "follows the machine's load); training measures it"
)


@dataclass(frozen=True)
class Workload:
    """What the data plan tells the budget: token lengths (None when unknown) and step counts."""

    lengths: list[int] | None
    sequences: int
    packing: bool
    total_steps: int
    eval_lengths: list[int] | None = None  # the eval rows kept (None: unknown or none)
    eval_sequences: int = 0  # what one evaluation iterates over
    evaluations: int = 0  # evaluations in the run (schedule.count_evaluations)
    eval_every: int | None = None  # steps between them (schedule.eval_every)
    # GRPO's tests reward: seconds one program costs a sandbox worker here (measured by the plan),
    # and the workers running a step's programs at once; None: no tests reward.
    program_seconds: float | None = None
    sandbox_workers: int = 1


def plan_budget(
    recipe: Recipe, shapes: Shapes, device: Device, work: Workload, dtype_bytes: int = 2, world_size: int = 1
) -> BudgetPlan:
    """Memory and time predictions for this recipe on this device (each of ``world_size`` GPUs
    training together), checked against every limit."""
    batch, seq = recipe.train.per_device_train_batch_size, recipe.model.max_seq_length
    each = row_passes(recipe)  # a preference pair trains 2 sequences of its padded length
    peak = each.sequences * peak_tokens_per_micro_batch(work.lengths, batch, seq, work.packing)
    mean = each.sequences * mean_tokens_per_micro_batch(
        work.lengths, work.sequences, batch, seq, work.packing
    )
    if recipe.train.grpo():  # every completion of the longest prompt's length, at its longest
        completion = recipe.train.method_options()["max_completion_length"]
        longest = max(work.lengths) if work.lengths else seq - completion
        peak = mean = batch * (longest + completion)
    memory = predict_memory(recipe, shapes, peak, dtype_bytes, device.is_gpu, world_size)
    time = predict_time(recipe, shapes, device, mean, work.total_steps, world_size)
    if work.program_seconds is not None:  # a step's completions run against their tests, at once
        rows = generation.rollout(recipe, 0).rows
        tests = generation.sandbox_seconds(rows, work.program_seconds, work.sandbox_workers)
        terms = {**time.terms, "running the tests": tests / recipe.train.gradient_accumulation_steps}
        time = replace(
            time,
            terms=terms,
            step_seconds=time.step_seconds + tests,
            total_seconds=time.total_seconds + tests * work.total_steps,
        )
    eval_memory = None
    if work.evaluations and work.eval_sequences:
        eval_batch = min(
            recipe.train.per_device_eval_batch_size, work.eval_sequences
        )  # no fuller than the set
        eval_peak = each.sequences * peak_tokens_per_micro_batch(
            work.eval_lengths, eval_batch, seq, work.packing
        )
        eval_memory = predict_eval_memory(recipe, shapes, eval_peak, dtype_bytes, device.is_gpu, world_size)
        tokens = each.sequences * (
            sum(work.eval_lengths) if work.eval_lengths and not work.packing else work.eval_sequences * seq
        )
        one = predict_eval_seconds(
            recipe, shapes, device, tokens, math.ceil(work.eval_sequences / eval_batch), 1 + each.forwards
        )
        time = replace(
            time,
            eval_seconds=one,
            evaluations=work.evaluations,
            eval_every=work.eval_every,
            total_seconds=time.total_seconds + one * work.evaluations,
        )
    # The upper end of the prediction must fit: a promise, not a coin toss.
    verdicts = [
        Verdict(
            f"peak memory (+{constant('memory_margin'):.0%}) on {device.name}",
            memory.upper / GIB,
            device.memory_bytes / GIB,
            "GiB",
        )
    ]
    if eval_memory is not None:
        verdicts.append(
            Verdict(
                f"peak memory of an evaluation (+{constant('memory_margin'):.0%}) on {device.name}",
                eval_memory.upper / GIB,
                device.memory_bytes / GIB,
                "GiB",
            )
        )
    budget = recipe.budget
    if budget.max_memory_gib is not None:
        verdicts.append(Verdict("peak memory (budget)", memory.upper / GIB, budget.max_memory_gib, "GiB"))
        if eval_memory is not None:
            verdicts.append(
                Verdict(
                    "peak memory of an evaluation (budget)",
                    eval_memory.upper / GIB,
                    budget.max_memory_gib,
                    "GiB",
                )
            )
    if budget.max_step_seconds is not None and device.is_gpu:  # on a CPU, the probe measures it
        verdicts.append(Verdict("seconds per step", time.step_seconds, budget.max_step_seconds, "s"))
    if budget.max_hours is not None and device.is_gpu:
        verdicts.append(Verdict("total hours", time.total_seconds / 3600, budget.max_hours, "h"))
    return BudgetPlan(
        device,
        memory,
        time,
        verdicts,
        recipe.model.backend,
        world_size,
        eval_memory,
        each.what,
        sampling_line(recipe, work, time, device.is_gpu),
    )


def sampling_line(recipe: Recipe, work: Workload, time: TimePlan, on_gpu: bool) -> str:
    """GRPO: what generates the completions, and what their tests cost (said on any device)."""
    if not recipe.train.grpo():
        return ""
    rows = generation.rollout(recipe, 0).rows
    engine = "Unsloth's" if recipe.model.backend == "unsloth" else "transformers'"
    line = f"sampling: {rows} completions a step in one call of {engine} own generate (vLLM is not used)"
    if on_gpu:
        share = time.terms["sampling the completions"] * recipe.train.gradient_accumulation_steps
        line += f", {share:.1f} s of each step"
    if work.program_seconds is not None:
        line += (
            f"; their tests: {work.program_seconds * 1e3:.0f} ms a program on this machine (measured now), "
            f"{work.sandbox_workers} at once"
        )
    return line


def predict_eval_seconds(
    recipe: Recipe, shapes: Shapes, device: Device, tokens: float, batches: int, forwards: int = 1
) -> float:
    """One evaluation: a forward pass (a third of training's matmul work without recomputation) over
    ``tokens`` in ``batches`` batches, with one dequantization of the 4-bit weights per batch;
    ``forwards`` passes of each batch where the method has a reference (engine.passes)."""
    sequences = batches * recipe.train.per_device_eval_batch_size * row_passes(recipe).sequences
    return forwards * forward_seconds(recipe, shapes, device, tokens, tokens / max(sequences, 1), batches) + (
        batches * constant("micro_batch_overhead_s")
    )


def forward_seconds(
    recipe: Recipe, shapes: Shapes, device: Device, tokens: float, seq_len: float, passes: int
) -> float:
    """Forward passes without gradients over ``tokens`` in sequences of ``seq_len``, in ``passes_``
    batches (each dequantizes the 4-bit weights once)."""
    linear, head = shapes.linear_parameters, shapes.vocab * shapes.hidden
    attention = 12 * shapes.layers * shapes.heads * shapes.head_dim * seq_len / 2 / 3
    flops = tokens * (2 * (linear + head) + attention)
    compute = flops / (constant("gemm_efficiency") * device.bf16_tflops * 1e12)
    dequant = 0.0
    if recipe.model.load_in_4bit:
        dequant = passes * 2.5 * linear / (constant("bandwidth_efficiency") * device.bandwidth_gbs * 1e9)
    return compute + dequant


def describe_budget(plan: BudgetPlan, allowed_tokens: int | None = None) -> list[str]:
    """The budget's lines; ``allowed_tokens``: what the recipe allows a micro-batch when the plan
    sized it from the data's rows, said when it is more."""
    memory = plan.memory
    engine = "Unsloth" if plan.backend == "unsloth" else "transformers + PEFT (no Unsloth)"
    each = f"each of {plan.world_size} x " if plan.world_size > 1 else ""
    sized = ""
    if allowed_tokens and allowed_tokens > memory.tokens_per_micro_batch:
        sized = (
            f" (from the data's rows; the recipe allows {allowed_tokens}: `plan --full-length` plans that)"
        )
    lines = [
        f"memory on {each}{plan.device.name} with {engine}, largest micro-batch "
        f"{memory.tokens_per_micro_batch} tokens{sized}:"
    ]
    lines += [f"  {name:<42} {value / GIB:8.2f} GiB" for name, value in memory.terms.items()]
    if memory.single_quant_weights is not None:  # Unsloth always double-quantizes; this is what it saves
        lines.insert(2, f"    (without double quantization: {memory.single_quant_weights / GIB:.2f} GiB)")
    if plan.counted:
        lines.insert(0, f"counted: {plan.counted} (TRL's trainer, read from its code)")
    if plan.sampling:
        lines.insert(1, plan.sampling)
    margin = constant("memory_margin")
    lines.append(
        f"  {'total':<42} {memory.total / GIB:8.2f} GiB  (+/-{margin:.0%}: "
        f"{memory.total * (1 - margin) / GIB:.2f}-{memory.upper / GIB:.2f} GiB)"
    )
    if memory.paged:
        lines.append(
            f"  (a paged optimizer: its {memory.paged / GIB:.2f} GiB of state live in CUDA unified memory, "
            "which can spill to host RAM; the total counts them on the GPU, and the measured peak, "
            "PyTorch's reserved memory, leaves them out)"
        )
    t = plan.time
    total = (
        f"{t.total_seconds / 3600:.2f} h" if t.total_seconds >= 3600 else f"{t.total_seconds / 60:.1f} min"
    )
    if not plan.time_predicted:
        lines.append(CPU_TIME)
    else:
        lines.append(
            f"time: {t.step_seconds:.2f} s per optimizer step (+/-{constant('time_margin'):.0%}), "
            f"{total} in all; {t.flops_per_token / 1e9:.1f} GFLOP per token"
        )
    if plan.eval_memory is not None:
        evaluation, margin = plan.eval_memory, constant("memory_margin")
        every = {None: "at the last step", 1: "every step"}.get(
            t.eval_every, f"every {t.eval_every} steps and at the last"
        )
        said = f"evaluations: {t.evaluations} ({every})"
        if plan.time_predicted:
            said += f", {t.eval_seconds:.1f} s each, {t.evaluations * t.eval_seconds / 60:.1f} min in all"
        lines.append(said)
        lines.append(
            f"  memory of one, largest eval batch {evaluation.tokens_per_micro_batch} tokens "
            "(beside the weights and optimizer state):"
        )
        lines += [
            f"    {name:<40} {value / GIB:8.2f} GiB"
            for name, value in evaluation.terms.items()
            if name.startswith(("eval ", "lm_head", "logits"))
        ]
        lines.append(
            f"    {'total':<40} {evaluation.total / GIB:8.2f} GiB  (+/-{margin:.0%}: "
            f"{evaluation.total * (1 - margin) / GIB:.2f}-{evaluation.upper / GIB:.2f} GiB)"
        )
    if plan.world_size > 1 and plan.time_predicted:
        lines.append(
            f"  ({plan.world_size} {'GPUs' if plan.device.is_gpu else 'processes'}: {plan.world_size}x the "
            "sequences per step; the LoRA gradients' "
            f"all-reduce over {t.link}: {t.allreduce_seconds * 1e3:.1f} ms per step)"
        )
    device = plan.device
    speed = f"{device.bf16_tflops:.0f} TFLOP/s, {device.bandwidth_gbs:.0f} GB/s"
    if plan.time_predicted:
        lines.append(f"  ({device.name}: {speed}; {device.source})")
    # Until the constants are fitted against runs measured on a GPU, the plan says so.
    if constants.FITTED:  # read now: a fit loaded after import counts
        lines.append(f"  (speed and allocator constants {next(iter(constants.FITTED.values()))['source']})")
    else:
        lines.append(
            "  (the margins are the targets; activations, logits, overheads and speed are not yet "
            "calibrated on a GPU)"
        )
    lines += [v.line() for v in plan.verdicts]
    return lines


def budget_as_dict(plan: BudgetPlan) -> dict:
    return {
        "device": plan.device.name,
        "backend": plan.backend,
        "memory_bytes": dict(plan.memory.terms),
        "single_quant_weights_bytes": plan.memory.single_quant_weights,
        "memory_total_bytes": plan.memory.total,
        "memory_margin": constant("memory_margin"),
        "memory_upper_bytes": plan.memory.upper,
        "paged_bytes": plan.memory.paged,
        "tokens_per_micro_batch": plan.memory.tokens_per_micro_batch,
        # False on a CPU: step_seconds is then the GPU speed model's figure, not a prediction
        "time_predicted": plan.time_predicted,
        "step_seconds": plan.time.step_seconds,
        "step_seconds_by_cause": dict(plan.time.terms),
        # The causes are per micro-batch; step_seconds is per optimizer step: their sum times
        # gradient_accumulation_steps, plus the all-reduce across processes.
        "step_seconds_by_cause_per": "micro-batch",
        "world_size": plan.world_size,
        "allreduce_seconds_per_step": plan.time.allreduce_seconds,
        "time_margin": constant("time_margin"),
        "total_hours": plan.time.total_seconds / 3600,  # evaluations included
        "evaluations": plan.time.evaluations,
        "eval_seconds_each": plan.time.eval_seconds,
        "eval_memory_bytes": dict(plan.eval_memory.terms) if plan.eval_memory else None,
        "eval_memory_total_bytes": plan.eval_memory.total if plan.eval_memory else None,
        "eval_tokens_per_batch": plan.eval_memory.tokens_per_micro_batch if plan.eval_memory else None,
        "verdicts": [
            {"what": v.what, "predicted": v.predicted, "limit": v.limit, "unit": v.unit, "ok": v.ok}
            for v in plan.verdicts
        ],
        "ok": plan.ok,
    }


# What no setting of a recipe changes: the weights and the CUDA context.
FIXED_TERMS = ("4-bit base weights", "base weights", "embeddings, lm_head, norms", "CUDA context")


def weights_exceed(budget: BudgetPlan, device: Device) -> bool:
    """Whether the weights and the CUDA context alone (with the margin) are more than the card."""
    weights = sum(v for k, v in budget.memory.terms.items() if k in FIXED_TERMS)
    return device.is_gpu and weights * (1 + constant("memory_margin")) > device.memory_bytes


def suggest(
    recipe: Recipe, shapes: Shapes, device: Device, work: Workload, dtype_bytes: int = 2, world_size: int = 1
) -> list[str]:
    """Changes that would make a failing plan pass, each with its predicted effect; when the
    weights alone exceed the card, that first, and the smallest card in the table that fits. A
    change that cannot reach the limit, even with all the others, is not printed."""
    current = plan_budget(recipe, shapes, device, work, dtype_bytes, world_size)
    ideas = []
    train, model = recipe.train, recipe.model
    limit = device.memory_bytes
    weights = sum(v for k, v in current.memory.terms.items() if k in FIXED_TERMS)
    too_big = weights_exceed(current, device)
    cards = [] if not device.is_gpu else sorted(GPUS.values(), key=lambda d: d.memory_bytes)
    fits = next((d for d in cards if plan_budget(recipe, shapes, d, work, dtype_bytes, world_size).ok), None)
    card = (
        f"the smallest card in the table it fits is the {fits.name} ({fits.memory_bytes / GIB:.0f} GiB)"
        if fits
        else ""
    )
    if too_big:
        return [
            f"the model's weights alone are {weights / GIB:.1f} GiB (with the CUDA context), more than "
            f"the {device.name}'s {limit / GIB:.0f} GiB: no setting makes it fit"
            + (f"; {card}" if card else "; no card in the table holds it: train it on several (--gpus)")
        ]
    savings = []
    current_eval = current.eval_memory.upper if current.eval_memory else 0.0
    # When only the evaluation's memory fails, a change helps only if it lowers that.
    only_evaluation = all("evaluation" in v.what for v in current.verdicts if not v.ok)

    def tried(label: str, changed: Recipe, changed_work: Workload = work, note: str = "") -> None:
        plan = plan_budget(changed, shapes, device, changed_work, dtype_bytes, world_size)
        eval_upper = plan.eval_memory.upper if plan.eval_memory else 0.0
        better = (
            eval_upper < current_eval
            if only_evaluation
            else (
                plan.memory.upper < current.memory.upper
                or plan.time.step_seconds < current.time.step_seconds
                or plan.time.total_seconds < current.time.total_seconds
            )
        )
        if not (plan.ok or better):
            return  # a change that improves nothing that fails is no suggestion
        effect = (
            f"peak {current.memory.upper / GIB:.1f} -> {plan.memory.upper / GIB:.1f} GiB, "
            + (f"evaluation {current_eval / GIB:.1f} -> {eval_upper / GIB:.1f} GiB, " if current_eval else "")
            + f"step {current.time.step_seconds:.2f} -> {plan.time.step_seconds:.2f} s, "
            f"total {current.time.total_seconds / 3600:.2f} -> {plan.time.total_seconds / 3600:.2f} h"
        )
        ideas.append(f"{'fits' if plan.ok else 'helps'}: {label} ({effect}{note})")
        savings.append(0.0 if plan.ok else max(0.0, current.memory.upper - plan.memory.upper))

    def with_(section: str, **values) -> Recipe:
        part = getattr(recipe, section).model_copy(update=values)
        return recipe.model_copy(update={section: part})

    # A smaller micro-batch with more accumulation keeps the effective batch: the largest that fits.
    effective = train.per_device_train_batch_size * train.gradient_accumulation_steps
    for batch in range(train.per_device_train_batch_size - 1, 0, -1):
        if train.per_device_train_batch_size % batch:
            continue
        smaller = with_(
            "train", per_device_train_batch_size=batch, gradient_accumulation_steps=effective // batch
        )
        if plan_budget(smaller, shapes, device, work, dtype_bytes, world_size).ok or batch == 1:
            tried(
                f"train.per_device_train_batch_size={batch} "
                f"train.gradient_accumulation_steps={effective // batch} (the same effective batch)",
                smaller,
            )
            break
    evaluation = current.eval_memory
    if evaluation is not None and train.per_device_eval_batch_size > 1 and not current.ok:
        batch = train.per_device_eval_batch_size
        while batch > 1:  # halved until it fits
            batch //= 2
            smaller = with_("train", per_device_eval_batch_size=batch)
            if plan_budget(smaller, shapes, device, work, dtype_bytes, world_size).ok or batch == 1:
                tried(f"train.per_device_eval_batch_size={batch} (evaluation only)", smaller)
                break
    if work.lengths:
        ordered = sorted(work.lengths)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        if p95 < model.max_seq_length and p95 < ordered[-1]:
            longer = sum(1 for n in work.lengths if n > p95)
            tried(
                f"model.max_seq_length={p95}",
                with_("model", max_seq_length=p95),
                replace(
                    work,
                    lengths=[min(n, p95) for n in work.lengths],
                    eval_lengths=work.eval_lengths and [min(n, p95) for n in work.eval_lengths],
                ),
                f"; {longer} of {len(work.lengths)} rows are longer and would be dropped or truncated",
            )
    if model.gradient_checkpointing != "unsloth" and model.backend == "unsloth":
        tried("model.gradient_checkpointing=unsloth", with_("model", gradient_checkpointing="unsloth"))
    if recipe.lora.r > 8:
        tried(f"lora.r={recipe.lora.r // 2}", with_("lora", r=recipe.lora.r // 2))
    if "8bit" not in train.optim:
        tried("train.optim=adamw_8bit", with_("train", optim="adamw_8bit"))
    if not recipe.data.packing and work.lengths and device.is_gpu:
        packed = count_packed_sequences(work.lengths, model.max_seq_length)
        tried(
            "data.packing=true (fewer, fuller sequences: faster, not smaller)",
            with_("data", packing=True),
            replace(
                work,
                sequences=packed,
                packing=True,
                total_steps=count_optimizer_steps(packed, train, world_size),
                eval_sequences=count_packed_sequences(work.eval_lengths or [], model.max_seq_length),
            ),
        )
    memory_short = not current.memory_fits
    if memory_short and not any(idea.startswith("fits") for idea in ideas):
        if current.memory.upper - sum(savings) > limit:  # all of them together stay over the card
            ideas = [idea for idea, saved in zip(ideas, savings, strict=True) if saved == 0.0]
            ideas.append(
                f"none of the usual changes brings it under {limit / GIB:.0f} GiB"
                + (f"; {card}" if card else "")
            )
    return ideas
