"""The tiny Llama 3 used by the demo, the tests and the smoke run.

No model hub is reachable in CI, so the smoke model is built here, deterministically: a
Llama-architecture checkpoint with seeded random weights and the *real* Llama 3 tokenizer, converted
from the tiktoken file that Meta's PyPI package `llama-models` ships. It is built once into a cache
folder outside git (``$FINETUNE_CACHE``, default ``~/.cache/finetune``) and reused.

Heavy imports (torch, transformers, tiktoken) happen inside the functions: importing this module is
cheap, and the training path imports unsloth before calling into it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

from finetune.base import locks
from finetune.base.files import cache_root, write_json
from finetune.base.fingerprint import folder_damage, folder_files

TINY_MODEL_NAME = "tiny-llama-3"

# Meta's Llama 3 special tokens, in id order after the 128,000 BPE ranks (llama_models.llama3.tokenizer).
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
NUM_SPECIAL_TOKENS = 256
NUM_BPE_TOKENS = 128_000
VOCAB_SIZE = NUM_BPE_TOKENS + NUM_SPECIAL_TOKENS  # 128,256, as in Llama 3.1

# Llama 3's pre-tokenizer split pattern (the same string as llama_models' `pat_str`).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Shape of the tiny model: Llama 3.1's architecture (GQA, llama3 RoPE scaling, untied embeddings,
# the full 128,256 vocabulary) at a size that trains in seconds on two CPU cores. Hidden sizes are
# multiples of 64 so bitsandbytes' 4-bit blocks tile them exactly, as they do the real model.
TINY_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    # The final RMSNorm fixes the hidden state's norm, so the lm_head's scale bounds how peaked the
    # output can get. With the usual 0.02 the logits can barely leave uniform (loss ~ln 128256) and
    # LoRA cannot move the loss; 0.1 gives a random model room to learn visibly in a few steps.
    "initializer_range": 0.1,
}
TINY_SEED = 1234

# Bump when the builder changes what it writes, so stale caches are rebuilt rather than trusted.
_BUILDER_VERSION = "2"  # 2: the files record (finetune-files.json)


def special_tokens() -> dict[str, int]:
    """All 256 Llama 3 special tokens with their ids (128000 ... 128255)."""
    names = _NAMED_SPECIAL_TOKENS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return {name: NUM_BPE_TOKENS + i for i, name in enumerate(names)}


def chat_template() -> str:
    """Meta's Llama 3.1 Instruct chat template, as shipped in its tokenizer_config.json."""
    return (files("finetune.data") / "templates" / "llama-3.1-instruct.jinja").read_text()


def tiktoken_file() -> Path:
    """Meta's Llama 3 BPE ranks, shipped inside the `llama-models` package (no download)."""
    import llama_models.llama3 as llama3_pkg

    return Path(llama3_pkg.__file__).parent / "tokenizer.model"


def tiny_model_dir() -> Path:
    """Where the tiny model lives; the folder name changes whenever its definition does."""
    key = json.dumps([_BUILDER_VERSION, TINY_CONFIG, TINY_SEED, chat_template()], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / f"{TINY_MODEL_NAME}-{digest}"


def build_llama3_tokenizer():
    """A transformers fast tokenizer equal to Meta's Llama 3.1 Instruct tokenizer."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = special_tokens()
    backend = TikTokenConverter(vocab_file=str(tiktoken_file()), pattern=_LLAMA3_PATTERN).converted()
    backend.add_special_tokens([AddedToken(tok, normalized=False, special=True) for tok in specials])
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"Llama 3 tokenizer has {backend.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    # Like Meta's tokenizer.json: byte-level offsets, then <|begin_of_text|> before every sequence.
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",  # the Instruct model ends each turn with <|eot_id|>
        pad_token="<|finetune_right_pad_id|>",  # a reserved token, so padding never aliases EOS
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        padding_side="right",
        chat_template=chat_template(),
        clean_up_tokenization_spaces=False,
    )


def tokenizer_digest() -> str:
    """Changes whenever what build_llama3_tokenizer writes would."""
    key = json.dumps([_BUILDER_VERSION, _LLAMA3_PATTERN, special_tokens(), chat_template()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def write_llama3_tokenizer(out_dir: Path) -> Path:
    """Save the Llama 3.1 Instruct tokenizer alone (for planning without the model)."""
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    build_llama3_tokenizer().save_pretrained(tmp_dir)
    try:
        tmp_dir.rename(out_dir)
    except OSError:  # another process finished first: keep its copy
        if not (out_dir / "tokenizer.json").is_file():
            raise
        shutil.rmtree(tmp_dir)
    return out_dir


def build_tiny_model(out_dir: Path) -> Path:
    """Write the tiny Llama (bf16 safetensors) and its tokenizer into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    specials = special_tokens()
    tokenizer = build_llama3_tokenizer()
    config = LlamaConfig(
        # A copy: transformers writes rope_theta into the rope_scaling dict it is given, which would
        # change TINY_CONFIG, and so tiny_model_dir's name, for the rest of the process.
        **copy.deepcopy(TINY_CONFIG),
        bos_token_id=specials["<|begin_of_text|>"],
        eos_token_id=[specials["<|end_of_text|>"], specials["<|eom_id|>"], specials["<|eot_id|>"]],
        pad_token_id=specials["<|finetune_right_pad_id|>"],
        dtype="bfloat16",
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    # Write into a sibling folder and rename, so an interrupted build never leaves a half cache.
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    write_json(tmp_dir / FILES_RECORD, folder_files(tmp_dir))  # checked at every use (ensure_tiny_model)
    try:
        tmp_dir.rename(out_dir)
    except OSError:  # another process (a second rank, a parallel test) built it first: the same model
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp_dir)
    return out_dir


FILES_RECORD = "finetune-files.json"  # the size and digest of every file, written with the model


def tiny_model_damage(out_dir: Path) -> str | None:
    """What is wrong with the cached tiny model's files (truncated, changed), or None."""
    record = out_dir / FILES_RECORD
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        return f"{FILES_RECORD} is missing or unreadable"
    return folder_damage(out_dir, recorded)


def ensure_tiny_model() -> Path:
    """Path to the tiny model, building it on first use (a few seconds). A cached copy whose files
    were damaged is built again, never loaded; one process builds while the others wait."""

    out_dir = tiny_model_dir()
    if out_dir.is_dir() and tiny_model_damage(out_dir) is None:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locks.exclusive(out_dir.with_name(out_dir.name + ".build.lock")):
        if out_dir.is_dir():
            damage = tiny_model_damage(out_dir)
            if damage is None:  # built meanwhile by another process
                return out_dir
            print(
                f"warning: the cached tiny model {out_dir} is damaged ({damage}): building it again",
                file=sys.stderr,
            )
            aside = out_dir.with_name(f".{out_dir.name}.damaged{os.getpid()}")
            out_dir.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        for debris in out_dir.parent.glob(f"{out_dir.name}.tmp*"):  # left by a build killed midway
            shutil.rmtree(debris, ignore_errors=True)
        build_tiny_model(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--tokenizer"]:
        print(write_llama3_tokenizer(Path(sys.argv[2])))
    else:
        print(ensure_tiny_model())
