"""The tiny model's tokenizer must be Meta's Llama 3.1 tokenizer, id for id."""

import json

import pytest
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune.models.tiny_model import TINY_CONFIG, build_tiny_model

SAMPLES = [
    "Hello world",
    "def add(a, b):\n    return a + b\n",
    "\tindented with a tab\n\n\ntrailing newlines\n\n",
    "ünïcödé, 中文, emoji 😀 and numbers 1234567",
    "SELECT name FROM users WHERE id = 42;",
    "  leading spaces and   runs   of spaces  ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_vocabulary_and_special_token_ids(tokenizer):
    assert len(tokenizer) == 128_256
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected} == expected
    meta = MetaTokenizer.get_instance().special_tokens
    assert {tok: tokenizer.convert_tokens_to_ids(tok) for tok in meta} == meta
    assert tokenizer.bos_token_id == 128000
    assert tokenizer.eos_token_id == 128009  # Instruct: every turn ends with <|eot_id|>
    assert tokenizer.pad_token_id == 128004  # never the EOS, or EOS would be masked as padding


def test_known_ids_for_a_known_string(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_metas_tiktoken_tokenizer(tokenizer, text):
    meta = MetaTokenizer.get_instance()
    assert tokenizer(text)["input_ids"] == meta.encode(text, bos=True, eos=False)
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_special_tokens_in_text_are_single_ids(tokenizer):
    ids = tokenizer("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"]
    assert ids == [128006, 882, 128007]


def test_llama31_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum a list."},
        {"role": "assistant", "content": "```python\nsum(xs)\n```"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Be brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSum a list.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n```python\nsum(xs)\n```<|eot_id|>"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Sum a list.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1  # one BOS, not two
    assert ids[-1] == 128009


def test_tiny_model_is_llama31_shaped_and_deterministic(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 128_256
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["rope_parameters"]["rope_type"] == "llama3"  # transformers 5 name for rope_scaling
    assert config["tie_word_embeddings"] is False
    assert 2 <= config["num_hidden_layers"] <= 4
    assert {k: config[k] for k in ("hidden_size", "intermediate_size")} == {
        k: TINY_CONFIG[k] for k in ("hidden_size", "intermediate_size")
    }
    rebuilt = build_tiny_model(tmp_path / "again")
    cached = load_file(tiny_model_dir / "model.safetensors")
    fresh = load_file(rebuilt / "model.safetensors")
    assert cached.keys() == fresh.keys()
    assert all(cached[name].equal(fresh[name]) for name in cached)
