"""The trained model at work: generation, the loss on given rows, and the merged export.

Heavy (Unsloth first, then torch and transformers); used by train.py (samples before and after
training), the smoke (the reloaded adapter) and the `generate` and `export` verbs.
"""

from __future__ import annotations

import finetune.stack  # noqa: F401  (first: Unsloth, set up, before the libraries it patches)

# isort: split
from pathlib import Path

import torch
from unsloth import FastLanguageModel

from finetune.prepare import IGNORE_INDEX, Example
from finetune.run import check_export_folder, finished_adapter
from finetune.store import Store


def generate_samples(model, tokenizer, store: Store, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first ``count`` held-out prompts (training rows when there is no
    eval data): each prompt is its row up to the first trained token."""
    if count == 0:
        return []
    split = "eval" if store.dataset("eval") is not None else "train"
    samples = []
    FastLanguageModel.for_inference(model)
    # Generation must not move the random streams training draws from.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for example in store.examples(split, limit=count):
            first = next((k for k, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)
            prompt = torch.tensor([example.input_ids[:first]], device=model.device)
            generated = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            samples.append(
                {
                    "source": example.source,
                    "prompt": tokenizer.decode(example.input_ids[:first]),
                    "completion": tokenizer.decode(generated[0][first:], skip_special_tokens=True),
                }
            )
    FastLanguageModel.for_training(model)
    return samples


def load_adapter(adapter_dir: Path, max_seq_length: int = 2048, load_in_4bit: bool = True):
    """A trained adapter on its base model, ready for generation."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), max_seq_length=max_seq_length, load_in_4bit=load_in_4bit
    )
    FastLanguageModel.for_inference(model)
    return model, tokenizer


def export(run_dir: Path, out_dir: Path) -> Path:
    """The adapter merged into its base model, saved as 16-bit safetensors that plain transformers
    (or vLLM, llama.cpp's converter, ...) loads without this tool or Unsloth.

    On a CPU, into the base model loaded in 16-bit. On a GPU the adapter is loaded on the recipe's
    4-bit base and Unsloth's save_pretrained_merged writes the 16-bit merge, for which it may fetch
    the unquantized base weights from the hub (unsloth_zoo/saving_utils.py, merge_and_overwrite_lora):
    offline without them on disk that fails, which is not handled here yet (unverified on a GPU)."""
    recipe, adapter = finished_adapter(run_dir)
    check_export_folder(out_dir)
    load_in_4bit = recipe.model.load_in_4bit and torch.cuda.is_available()
    model, tokenizer = load_adapter(adapter, recipe.model.max_seq_length, load_in_4bit)
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return out_dir


def mean_loss(model, examples: list[Example]) -> float:
    """The model's mean loss over these rows' trained tokens, one row at a time."""
    losses = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids], device=model.device)
            labels = torch.tensor([example.labels], device=model.device)
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def generate_from_run(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Stream the trained model's answer to one user message (chat template, greedy) to stdout."""
    from transformers import TextStreamer

    recipe, adapter = finished_adapter(run_dir)
    model, tokenizer = load_adapter(adapter, recipe.model.max_seq_length, recipe.model.load_in_4bit)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(model, tokenizer, prompt, max_new_tokens, streamer)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, streamer=None) -> str:
    """Greedy completion of one user turn, rendered with the chat template (and streamed, given a
    transformers streamer)."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
