"""The training stack, imported the one way that works; every heavy module imports this first.

Two engines, one per process, chosen before this module is first imported (train/backend.py's use_backend sets
FINETUNE_BACKEND from the recipe's model.backend):

- unsloth (the default). Unsloth patches transformers, TRL and PEFT when it is imported, so it must
  come before them. Two of its defaults are set here, before that import, because it reads them only
  then: it downloads a statistics file from the hub at every model load on a GPU (a hung hub costs
  120 s, then aborts the load): never, here; and it writes the kernels and trainer classes it
  generates on a GPU into ./unsloth_compiled_cache, wherever the user happens to run from: under our
  cache folder instead. A user's own setting of either wins. Unsloth decides its device when
  imported and refuses (NotImplementedError) a machine where an NVIDIA driver is loaded but torch
  cannot use the GPU, rather than fall back to the CPU: that is one sentence here, a UserError,
  raised before any run folder is made (lifecycle.new_run_folder).
- transformers: plain transformers + PEFT + bitsandbytes (QLoRA), and unsloth is never imported (it
  would patch the libraries for the whole process).

The functions below hold what differs: loading, LoRA, the trainer's optimizer and mixed precision,
switching between training and generation, and reloading an adapter. The trainer (TRL's SFTTrainer)
is shared; on the CPU without Unsloth its loss is transformers' own (train.FinetuneTrainer).
"""

import json
import logging
import os
import sys
from pathlib import Path

from finetune.base.errors import UserError
from finetune.base.files import cache_root

BACKEND = os.environ.get("FINETUNE_BACKEND", "unsloth")
if BACKEND not in ("unsloth", "transformers"):
    raise UserError(f"FINETUNE_BACKEND={BACKEND!r}: the backends are 'unsloth' and 'transformers'")

# Notices a user can do nothing about, silenced through the libraries' own loggers, before the
# libraries load (our own warnings and errors never pass through these): torchao registering its
# Enums with torch's pytree, deprecated since torch 2.9; bitsandbytes' optional CPU kernel, a hub
# download that fails offline and falls back by itself.
for _name in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# Progress bars only on a terminal: written to a file or a pipe they are a wall of carriage returns.
PROGRESS_BARS = sys.stderr.isatty()

if BACKEND == "unsloth":
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(cache_root() / "unsloth_compiled_cache"))
    try:
        import unsloth  # noqa: F401
    except NotImplementedError as refusal:
        driver = Path("/proc/driver/nvidia/version")
        found = (
            f"an NVIDIA driver is loaded ({driver.read_text().split(chr(10))[0].strip()})"
            if driver.is_file()
            else "no GPU that torch can use was found"
        )
        raise UserError(
            f"Unsloth cannot start on this machine: {refusal} ({found}). If a GPU is there, update its "
            "driver or install the torch build for the CUDA version the driver supports; to train a "
            "small model on the CPU, hide the GPU with CUDA_VISIBLE_DEVICES=''."
        ) from None
    from unsloth import FastLanguageModel

import datasets  # noqa: E402
import torch  # noqa: E402  (after unsloth, on its backend)
import transformers  # noqa: E402

# Two notices of the trainer's, right and nothing for a user to do, filtered by their text (the
# logger's other warnings still show): it sets the model's end-of-sequence id to the tokenizer's
# (Llama 3's <|eot_id|>, where a chat answer ends) where the config lists several, on every run;
# and checkpoints saved within a second of each other are ordered by step, not by time.
_TRAINER_NOTICES = (
    "The tokenizer has new PAD/BOS/EOS tokens",
    "mtime may not be reliable on this filesystem",
)
transformers.utils.logging.get_logger("transformers.trainer_utils").addFilter(
    lambda record: not record.getMessage().startswith(_TRAINER_NOTICES)
)

if not PROGRESS_BARS:  # datasets' map() bars in TRL, transformers' "Loading weights"
    datasets.disable_progress_bars()
    transformers.utils.logging.set_tqdm_hook(lambda bar, args, kwargs: bar(*args, **kwargs, disable=True))

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth", "standard": True, "off": False}
# The recipe's lora.init_lora_weights as LoraConfig takes it (True: B = 0, A Kaiming-uniform).
_INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian"}


def compute_dtype(dtype: str) -> torch.dtype | None:
    """The recipe's model.dtype; 'auto' is None for Unsloth (which picks), and for transformers
    bfloat16 on a GPU that has it, float16 on one without, float32 on the CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if BACKEND == "unsloth":
        return None
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _device_map():
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def load_model(path: str, max_seq_length: int, load_in_4bit: bool, dtype: str):
    """The base model (4-bit NF4 when asked) and its tokenizer."""
    if BACKEND == "unsloth":
        return FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=max_seq_length,
            load_in_4bit=load_in_4bit,
            dtype=compute_dtype(dtype),
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kind = compute_dtype(dtype)
    quantization = None
    if load_in_4bit and not _is_quantized(path):
        # QLoRA as Unsloth's repositories store it: NF4, double-quantized, computing in `kind`.
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kind,
        )
    # quantization_config only when we quantize: transformers 5.17 takes an explicit None as "none"
    # and then cannot load a pre-quantized checkpoint (every 4-bit weight a size mismatch).
    extra = {"quantization_config": quantization} if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=kind, device_map=_device_map(), attn_implementation="sdpa", **extra
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _is_quantized(path: str) -> bool:
    """A pre-quantized checkpoint (its config carries the quantization, which loading applies)."""

    config = Path(path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def add_lora(model, lora, checkpointing: str, seed: int, max_seq_length: int):
    """Trainable LoRA adapters on the frozen base (``lora``: the recipe's section), with the gradient
    checkpointing that runs (plan.engine.checkpointing)."""
    if BACKEND == "unsloth":
        return FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,  # through **kwargs to LoraConfig; Unsloth checks it on reuse
            init_lora_weights=_INIT_LORA_WEIGHTS[lora.init_lora_weights],
            bias="none",
            use_gradient_checkpointing=_UNSLOTH_CHECKPOINTING[checkpointing],
            random_state=seed,
            max_seq_length=max_seq_length,
        )
    from peft import LoraConfig, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing != "off":
        # Not peft.prepare_model_for_kbit_training: it would upcast the embeddings, lm_head and norms
        # to fp32 (2 GiB more for Llama 3.1 8B); only its checkpointing part is wanted.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # the adapters' initialisation, as Unsloth's random_state
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=_INIT_LORA_WEIGHTS[lora.init_lora_weights],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainer_settings(optim: str, engine_optimizer: str, dtype: str) -> dict:
    """SFTConfig's optimizer and mixed precision. Unsloth's generated config takes the recipe's
    ``optim`` and makes the substitution plan.engine mirrors itself; for transformers, what
    Unsloth's would: ``engine_optimizer`` (the CPU has no bitsandbytes optimizers: fused AdamW
    instead), and on a GPU autocast in the compute dtype."""
    if BACKEND == "unsloth":
        return {"optim": optim}
    on_gpu, kind = torch.cuda.is_available(), compute_dtype(dtype)
    return {
        "optim": engine_optimizer,
        "bf16": on_gpu and kind == torch.bfloat16,
        "fp16": on_gpu and kind == torch.float16,
    }


def for_inference(model) -> None:
    if BACKEND == "unsloth":
        FastLanguageModel.for_inference(model)
    else:
        model.eval()


def for_training(model) -> None:
    if BACKEND == "unsloth":
        FastLanguageModel.for_training(model)
    else:
        model.train()


def load_adapter(adapter_dir: Path, max_seq_length: int, load_in_4bit: bool):
    """A trained adapter on its base model, ready for generation."""
    if BACKEND == "unsloth":
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter_dir), max_seq_length=max_seq_length, load_in_4bit=load_in_4bit
        )
    else:
        from peft import PeftModel

        base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, _ = load_model(base, max_seq_length, load_in_4bit, "auto")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    for_inference(model)
    return model, tokenizer


def device_record(compute_dtype: torch.dtype) -> dict:
    """What this process trains on, for the run's manifest: the device, the dtype the model computes
    in (on a CPU Unsloth picks bfloat16 where the CPU has it, AMX or AVX-512 BF16, else float32: the
    same recipe's losses differ in the fourth digit between the two), and the allocator's settings,
    which Unsloth changes when imported (expandable segments) and the transformers backend does not."""
    allocator = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    dtype = str(compute_dtype).removeprefix("torch.")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "allocator": allocator,
            "compute_dtype": dtype,
        }
    return {"type": "cpu", "threads": torch.get_num_threads(), "allocator": allocator, "compute_dtype": dtype}
