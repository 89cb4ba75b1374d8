"""The end-to-end tier: real training of the tiny model through Unsloth, TRL and transformers.

Unsloth patches transformers, TRL and PEFT when it is imported, and must be imported before them.
These tests share one process, and some import transformers directly (the tokenizer tests), so the
import order is fixed here, once, before any of them is collected. Every test here is marked e2e.
"""

import finetune.stack  # noqa: F401  (first: Unsloth, set up, before what the tests import)

# isort: split
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/cli_helpers.py

from finetune.tiny_model import ensure_tiny_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)
            if "gpu" in item.keywords and not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_model_dir():
    return ensure_tiny_model()
