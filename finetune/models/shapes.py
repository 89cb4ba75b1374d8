"""A Llama-style decoder's shapes from its config.json, and what they count exactly: parameters, the
LoRA (and DoRA) tensors a recipe trains, and the bytes of NF4-quantized weights. Pure Python, no torch;
budget.py predicts memory and time from these, and the e2e tier checks them against the libraries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files

from finetune.recipe.schema import LLAMA_PROJECTIONS

# bitsandbytes NF4 as Unsloth loads it (bnb_4bit_use_double_quant=True): 4 bits per weight, one
# absmax per 64 weights, stored as uint8 and itself quantized with one fp32 absmax per 256 blocks.
BNB_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
# Per quantized tensor: the 16-entry NF4 code (fp32), the 256-entry nested code (fp32), the offset.
BNB_PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4


SHIPPED_CONFIGS = files("finetune.models") / "configs"


def shipped_config(model_name: str) -> dict | None:
    """The public config of a model the shipped recipes use (its file named as the model's name
    contains it: llama-3.2-1b, ...), so planning needs no download."""
    found = [path for path in SHIPPED_CONFIGS.glob("*.json") if path.stem in model_name.lower()]
    return json.loads(found[0].read_text()) if found else None


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Shapes:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=config.get("tie_word_embeddings", False),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in features, out features) of each linear layer in one decoder layer."""
        h, q, kv, f = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        # q, k, v, o, then gate, up, down (LLAMA_PROJECTIONS' order)
        shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
        return dict(zip(LLAMA_PROJECTIONS, shapes, strict=True))

    @property
    def linear_parameters(self) -> int:
        return self.layers * sum(i * o for i, o in self.projections().values())

    @property
    def embedding_parameters(self) -> int:
        """Input embeddings plus lm_head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_parameters(self) -> int:
        return (2 * self.layers + 1) * self.hidden


def count_parameters(config: dict) -> int:
    """Parameters of a Llama-style decoder from its config.json (embeddings, attention, MLP, norms)."""
    shapes = Shapes.from_config(config)
    return shapes.linear_parameters + shapes.embedding_parameters + shapes.norm_parameters


def targeted_projections(shapes: Shapes, target_modules: list[str]) -> list[tuple[int, int]]:
    """(in, out) features of each targeted projection of one decoder layer."""
    return [(i, o) for name, (i, o) in shapes.projections().items() if name in target_modules]


def lora_tensor_sizes(shapes: Shapes, r: int, target_modules: list[str], dora: bool = False) -> list[int]:
    """Elements of each LoRA tensor: A (r x in) and B (out x r) for every targeted projection of
    every layer, and with DoRA its magnitude vector (one per output row, PEFT's
    lora_magnitude_vector)."""
    per_layer = [
        n
        for i, o in targeted_projections(shapes, target_modules)
        for n in (r * i, o * r, *((o,) if dora else ()))
    ]
    return per_layer * shapes.layers


def lora_parameters(shapes: Shapes, r: int, target_modules: list[str], dora: bool = False) -> int:
    return sum(lora_tensor_sizes(shapes, r, target_modules, dora))


def nf4_bytes(num_weights: int) -> int:
    """Bytes of one NF4-quantized weight tensor with double quantization (data, absmax, constants)."""
    blocks = math.ceil(num_weights / BNB_BLOCKSIZE)
    return num_weights // 2 + blocks + math.ceil(blocks / BNB_NESTED_BLOCKSIZE) * 4 + BNB_PER_TENSOR_BYTES


def nf4_bytes_single_quant(num_weights: int) -> int:
    """The same without double quantization: one fp32 absmax per 64 weights."""
    return num_weights // 2 + math.ceil(num_weights / BNB_BLOCKSIZE) * 4 + 16 * 4
