"""Our pure figures held to the libraries themselves: parameter counts against the model transformers
and PEFT build, 4-bit sizes against what bitsandbytes stores, the packing count against TRL's packer.
The fast tier computes them without these libraries; this is where they are proved."""

import json
import random
from pathlib import Path

import pytest
from data_helpers import find_tokenizer, load_conversations, prepare

from finetune.data.tokenize import count_packed_sequences
from finetune.models import shapes
from finetune.models.shapes import Shapes, shipped_config
from finetune.plan import loss_memory
from finetune.recipe.schema import LLAMA_PROJECTIONS, DataSection

ROOT = Path(__file__).resolve().parents[2]
LLAMA_8B = shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit")
ALL_SEVEN = list(LLAMA_PROJECTIONS)
CHAT = load_conversations([str(ROOT / "data_samples" / "code_chat.jsonl")])


def test_llama_8b_counts_against_the_model_instantiated_on_the_meta_device():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == shapes.count_parameters(LLAMA_8B)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=ALL_SEVEN))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == shapes.lora_parameters(Shapes.from_config(LLAMA_8B), 16, ALL_SEVEN) == 41_943_040


def test_llama_8b_dora_count_against_peft_on_the_meta_device():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, target_modules=ALL_SEVEN, use_dora=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # code-gen's rank: 83,886,080 LoRA weights and one magnitude per output row of each projection.
    assert trainable == shapes.lora_parameters(Shapes.from_config(LLAMA_8B), 32, ALL_SEVEN, dora=True)
    assert trainable == 83_886_080 + 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)


@pytest.mark.parametrize("shape", [(128, 128), (512, 128), (4096, 1024), (300, 7)])
def test_nf4_bytes_equal_what_bitsandbytes_stores(shape):
    """Data, absmax, nested absmax, both codes and the offset, as bitsandbytes builds them."""
    import bitsandbytes.functional as F
    import torch

    weight = torch.randn(shape, dtype=torch.float32)
    for nested, predicted in ((True, shapes.nf4_bytes), (False, shapes.nf4_bytes_single_quant)):
        data, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
        tensors = [data, state.absmax, state.code]
        if nested:
            tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
        stored = sum(t.numel() * t.element_size() for t in tensors)
        assert stored == predicted(weight.numel()), (shape, nested)


def test_packing_count_equals_trls_best_fit_decreasing_packer():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(0)
    cases = [[rng.randint(1, 1024) for _ in range(rng.randint(1, 300))] for _ in range(20)]
    cases.append(
        [
            len(e.input_ids)
            for e in prepare(CHAT, find_tokenizer("tiny-llama-3"), DataSection(train=["x"]), 4096).examples
        ]
    )
    cases.append([1024, 1024, 1, 1023, 512, 512, 2000])  # exact fits and an over-long row
    for lengths in cases:
        dataset = Dataset.from_dict({"input_ids": [[7] * n for n in lengths]})
        packed = pack_dataset(dataset, seq_length=1024, strategy="bfd")
        assert count_packed_sequences(lengths, 1024) == len(packed), lengths


def test_device_speed_is_measured_with_torch_in_a_child_process_and_cached(tmp_path, monkeypatch):
    """The path a GPU takes (`cuda`), run on the CPU here: a child process measures, the cache answers;
    from any working directory, not only the repository's."""
    from finetune.plan.device_speed import cached_measurement

    monkeypatch.chdir(tmp_path)

    first = cached_measurement("cpu", "This CPU", tmp_path)
    assert first is not None and first["tflops"] > 0 and first["bandwidth_gbs"] > 0
    (cache,) = tmp_path.glob("cpu-This-CPU.json")
    assert cached_measurement("cpu", "This CPU", tmp_path) == first  # from the cache, not re-measured
    stale = {**first, "measured_at": first["measured_at"] - 2 * 24 * 3600}
    cache.write_text(json.dumps(stale))
    assert cached_measurement("cpu", "This CPU", tmp_path)["measured_at"] > stale["measured_at"]


def test_the_transformers_backends_loss_term_uses_trls_fused_head_tile_sizes():
    """loss_memory.transformers_loss_bytes follows TRL's fused LM head, which SFTTrainer's loss
    always uses on a GPU (a tile of 4096 rows x 32768 vocabulary columns)."""
    import inspect

    from trl.kernels import chunked_logprob
    from trl.trainer import sft_trainer, utils

    assert chunked_logprob.TOKEN_CHUNK_SIZE == loss_memory.TRL_TOKEN_CHUNK
    assert utils._CHUNKED_LOGPROB_CHUNK_SIZE == loss_memory.TRL_VOCAB_CHUNK
    assert "fused_lm_head=True" in inspect.getsource(sft_trainer.SFTTrainer.compute_loss)


def test_the_loss_terms_chunk_sizes_are_the_ones_unsloths_fused_cross_entropy_uses():
    """loss_memory.logits_bytes follows the GPU loss code read in unsloth_zoo (its chunk rows and block
    bytes); a release that changes them changes our memory model, and this says so."""
    from unsloth_zoo.fused_losses import fused_linear

    assert fused_linear._BWD_ROWS == loss_memory.FLASH_ROWS
    assert fused_linear._BWD_TILE_BYTES == loss_memory.FLASH_BLOCK_BYTES
    vocab, hidden = LLAMA_8B["vocab_size"], LLAMA_8B["hidden_size"]
    # Below 4096 labelled tokens on a large card: chunks of 512 rows of the whole vocabulary.
    for labelled in (600, 2000, 4095):
        assert fused_linear.fused_linear_rows(labelled, hidden, vocab) == loss_memory.CHUNK_ROWS
    assert fused_linear.fused_linear_rows(300, hidden, vocab) == 300
    assert 16 * 1024 * 1024 // vocab == loss_memory.CPU_CHUNK_ROWS
    import inspect

    from unsloth_zoo.cpu import ops

    assert 'UNSLOTH_CPU_CE_CHUNK_ELEMENTS", 16 * 1024 * 1024' in inspect.getsource(ops)


def _transformers_stop(losses: list[float], patience: int, threshold: float) -> int | None:
    """Where transformers' own EarlyStoppingCallback ends a run evaluating these losses, with the
    trainer's best-metric bookkeeping (Trainer._determine_best_metric) run after each evaluation."""
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(
        output_dir="unused", eval_strategy="steps", metric_for_best_model="eval_loss",
        greater_is_better=False, load_best_model_at_end=True, report_to=[],
    )  # fmt: skip
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(patience, threshold)
    for step, loss in enumerate(losses, start=1):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if state.best_metric is None or loss < state.best_metric:
            state.best_metric = loss
        if control.should_training_stop:
            return step
    return None


def test_our_early_stopping_rule_is_transformers_own():
    """finetune.runs.outcome.early_stop_step (what the smoke and the tests hold a run to) against
    transformers' callback, on random loss curves with plateaus and thresholds."""
    from finetune.runs.outcome import early_stop_step

    rng = random.Random(0)
    for _ in range(300):
        losses = [round(rng.uniform(1.0, 2.0), 1) for _ in range(rng.randint(1, 12))]  # ties happen
        patience, threshold = rng.randint(1, 4), rng.choice([0.0, 0.05, 0.2])
        ours = early_stop_step(list(enumerate(losses, start=1)), patience, threshold)
        assert ours == _transformers_stop(losses, patience, threshold), (losses, patience, threshold)
