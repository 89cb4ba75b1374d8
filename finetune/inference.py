"""The trained model at work: generation, the loss on given rows, and the merged export.

Heavy (Unsloth first, then torch and transformers); used by train.py (samples before and after
training), the smoke (the reloaded adapter) and the `generate` and `export` verbs.
"""

from __future__ import annotations

from finetune import stack  # first: the backend (Unsloth, set up, before the libraries it patches)

# isort: split
import shutil
from pathlib import Path

import torch

from finetune.export import MergeBase, readme
from finetune.files import write_atomic
from finetune.internals import forget_quantized_loading
from finetune.prepare import IGNORE_INDEX, Example
from finetune.run import disk_full_as, finished_adapter
from finetune.store import Store
from finetune.tiny_model import TINY_MODEL_NAME, ensure_tiny_model


def generate_samples(model, tokenizer, store: Store, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first ``count`` held-out prompts (training rows when there is no
    eval data): each prompt is its row up to the first trained token. One batched generation,
    left-padded, instead of one per prompt: the same greedy tokens in a fraction of the time."""
    if count == 0:
        return []
    split = "eval" if store.dataset("eval") is not None else "train"
    examples = list(store.examples(split, limit=count))
    prompts = [
        example.input_ids[: next((k for k, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)]
        for example in examples
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    stack.for_inference(model)
    # Generation must not move the random streams training draws from.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    stack.for_training(model)
    return [
        {
            "source": example.source,
            "prompt": tokenizer.decode(prompt),
            "completion": tokenizer.decode(row[width:], skip_special_tokens=True),
        }
        for example, prompt, row in zip(examples, prompts, generated, strict=True)
    ]


def load_adapter(adapter_dir: Path, max_seq_length: int = 2048, load_in_4bit: bool = True):
    """A trained adapter on its base model, ready for generation."""
    return stack.load_adapter(adapter_dir, max_seq_length, load_in_4bit)


def export(run_dir: Path, out_dir: Path, base: MergeBase) -> Path:
    """The adapter merged into ``base`` (finetune/export.py chose it and checked the room), saved as
    16-bit safetensors with the run's tokenizer and a README.md saying which base it is. Plain
    transformers and PEFT, on the CPU: the same on every machine, and a GPU of any size can export."""
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, adapter = finished_adapter(run_dir)
    folder = base.path
    if base.name == TINY_MODEL_NAME:
        folder = ensure_tiny_model()  # rebuilt, identical, if its cache folder was cleared
    elif folder is None:  # the 16-bit original, fetched now (its size was said and checked)
        folder = Path(snapshot_download(base.name, allow_patterns=["*.json", "*.safetensors", "*.model"]))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="cpu")
    if base.dequantize:
        model = model.dequantize()  # bitsandbytes' 4-bit weights to their compute dtype
        forget_quantized_loading(model)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    then = f"nothing of the run changed and {out_dir} was removed; free some space and export again"
    try:
        with disk_full_as("the merged model", out_dir, run_dir, then=then):
            merged.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
            write_atomic(out_dir / "README.md", readme(run_dir, base))
    except BaseException:
        # A half-written merge must not pass for a model; the folder was new or empty (checked), so
        # removing it loses nothing of the user's, and `export` can simply be run again.
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
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
