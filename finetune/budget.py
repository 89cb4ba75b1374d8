"""Pure numbers about a model, derived from its config.json: no torch, no weights.

The memory and step-time predictions grow here; for now, the parameter count that decides whether a
model is small enough to train on a CPU.
"""

from __future__ import annotations


def count_parameters(config: dict) -> int:
    """Parameters of a Llama-style decoder from its config.json (embeddings, attention, MLP, norms)."""
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + hidden
