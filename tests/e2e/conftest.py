"""The end-to-end tier: real training of the tiny model through Unsloth, TRL and transformers.

Unsloth patches transformers, TRL and PEFT when it is imported, and must be imported before them.
These tests share one process, and some import transformers directly (the tokenizer tests), so the
import order is fixed here, once, before any of them is collected. Every test here is marked e2e.
"""

import finetune.train.stack  # noqa: F401  (first: Unsloth, set up, before what the tests import)

# isort: split
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/cli_helpers.py

from finetune.models.tiny_model import ensure_tiny_model  # noqa: E402

HERE = Path(__file__).resolve().parent
# FINETUNE_GPU_TESTS_ON_CPU=1 runs the gpu-marked tests where there is no CUDA, on the CPU: a
# rehearsal of their mechanics (commands, files, what they parse), so that the few minutes of a lent
# GPU are not spent finding a misspelled path. What only CUDA shows is guarded inside each test
# (test_gpu.ON_CUDA).
GPU_TESTS_ON_CPU = os.environ.get("FINETUNE_GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if "gpu" in item.keywords and not torch.cuda.is_available() and not GPU_TESTS_ON_CPU:
                reason = "needs a CUDA GPU (FINETUNE_GPU_TESTS_ON_CPU=1 rehearses them on the CPU)"
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The smoke recipe trained for 2 steps, once for every test that reads a finished run (each
    must leave it as it is: copy it to change it)."""
    from cli_helpers import runner

    out = tmp_path_factory.mktemp("finished")
    trained = runner(
        "recipes/smoke.yaml", f"output.dir={out / 'runs'}", "train.max_steps=2", "train.warmup_steps=1",
        "output.samples=0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (out / "runs" / "smoke").iterdir()
    return run_dir


@pytest.fixture(scope="session")
def tiny_model_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def four_bit_tiny_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model saved as bitsandbytes NF4, double-quantized, as Unsloth's `-bnb-4bit`
    repositories are: the form of the GPU recipes' base model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("models") / "tiny-llama-3-bnb-4bit"
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization, device_map="cpu"
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder
