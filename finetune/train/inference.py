"""The trained model at work: generation, the loss on given rows, and the merged export.

Heavy (Unsloth first, then torch and transformers); used by training.py (samples before and after
training), the smoke (the reloaded adapter) and the `generate` and `export` verbs.
"""

from __future__ import annotations

from finetune.train import stack  # first: the backend (Unsloth, set up, before the libraries it patches)

# isort: split
import contextlib
import gc
import time
from pathlib import Path

import torch

from finetune.base.files import write_atomic
from finetune.base.internals import forget_quantized_loading
from finetune.data.store import Store
from finetune.data.tokenize import IGNORE_INDEX, Example
from finetune.export.merging import MergeBase, readme
from finetune.models.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from finetune.runs.run_folder import finished_adapter


def generate_samples(model, tokenizer, store: Store, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first ``count`` held-out prompts (training rows when there is no
    eval data): each prompt is its row up to the first trained token (a GRPO task's row is all
    prompt). One batched generation."""
    if count == 0:
        return []
    split = "eval" if store.dataset("eval") is not None else "train"
    examples = list(store.examples(split, limit=count))
    prompts = [
        example.input_ids[
            : next(
                (k for k, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels)
            )
        ]
        for example in examples
    ]
    # Generation must not move the random streams training draws from.
    with torch.random.fork_rng(devices=[]):
        completions = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
    stack.for_training(model)
    return [
        {"source": example.source, "prompt": tokenizer.decode(prompt), "completion": completion}
        for example, prompt, completion in zip(examples, prompts, completions, strict=True)
    ]


def generate_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: tuple[str, ...] = (),
    temperature: float = 0.0,
    batch_size: int = 16,
    advance=None,
) -> list[str]:
    """The generated text (special tokens dropped) for each prompt, in their order. Batched and
    left-padded (the same greedy tokens as one at a time, in a fraction of the time), longest prompts
    first so that a batch too large for the GPU shows at once; such a batch is halved and retried.
    Each answer ends at its end of turn or at the first of ``stops``; sampled (top_p 0.95) when
    ``temperature`` > 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))
    texts: list[str] = [""] * len(prompts)
    sampling = {"temperature": temperature, "top_p": 0.95} if temperature else {}
    stack.for_inference(model)
    done = 0
    while done < len(order):
        chunk = order[done : done + batch_size]
        width = max(len(prompts[k]) for k in chunk)
        ids = torch.tensor(
            [[pad] * (width - len(prompts[k])) + prompts[k] for k in chunk], device=model.device
        )
        mask = torch.tensor(
            [[0] * (width - len(prompts[k])) + [1] * len(prompts[k]) for k in chunk], device=model.device
        )
        try:
            with torch.no_grad():
                rows = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=bool(temperature),
                    pad_token_id=pad,
                    **({"stop_strings": list(stops), "tokenizer": tokenizer} if stops else {}),
                    **sampling,
                )
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            del ids, mask
            torch.cuda.empty_cache()
            batch_size //= 2
            continue
        for k, row in zip(chunk, rows, strict=True):
            texts[k] = tokenizer.decode(row[width:], skip_special_tokens=True)
        done += len(chunk)
        if advance is not None:
            advance(len(chunk))
    return texts


def prompt_ids(tokenizer, messages: list[dict] | None, text: str) -> list[int]:
    """A prompt's tokens: chat ``messages`` through the tokenizer's chat template, followed by
    ``text`` (the start of the assistant's answer); without messages, ``text`` after the BOS token."""
    if messages is None:
        return tokenizer(text).input_ids
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered + text, add_special_tokens=False).input_ids


def answer_with_and_without_adapter(run_dir: Path, requests, settings, stops, progress=None):
    """Each request answered by the base model (the adapter switched off) and by the adapter, from
    one load: ({"base": texts, "adapter": texts}, seconds each). ``requests``: (messages, text)
    pairs, see prompt_ids; ``settings``: the recipe's evaluate section; ``progress(total)``: a
    callback advanced by answers generated. Both models draw the same random stream when sampling."""
    recipe, adapter = finished_adapter(run_dir)
    if torch.cuda.is_available():  # what a training run in this process left behind
        gc.collect()
        torch.cuda.empty_cache()
    model, tokenizer = load_adapter(adapter, recipe.model.max_seq_length, recipe.model.load_in_4bit)
    prompts = [prompt_ids(tokenizer, messages, text) for messages, text in requests]
    advance = progress(2 * len(prompts)) if progress else None
    answers, seconds = {}, {}
    for name in ("base", "adapter"):
        start = time.perf_counter()
        torch.manual_seed(recipe.train.seed)
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            answers[name] = generate_texts(
                model,
                tokenizer,
                prompts,
                settings.max_new_tokens,
                stops,
                settings.temperature,
                settings.batch_size,
                advance,
            )
        seconds[name] = time.perf_counter() - start
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers, seconds


def load_adapter(adapter_dir: Path, max_seq_length: int = 2048, load_in_4bit: bool = True):
    """A trained adapter on its base model, ready for generation."""
    return stack.load_adapter(adapter_dir, max_seq_length, load_in_4bit)


def export(run_dir: Path, out_dir: Path, base: MergeBase) -> Path:
    """The adapter merged into ``base`` (finetune/export/merging.py chose it and checked the room), saved as
    16-bit safetensors with the run's tokenizer and a README.md saying which base it is, into
    ``out_dir`` (run.export_folder's staging folder). Plain transformers and PEFT, on the CPU: the
    same on every machine, and a GPU of any size can export."""
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
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_atomic(out_dir / "README.md", readme(run_dir, base))
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
