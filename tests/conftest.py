"""Shared test setup.

Unsloth patches transformers, TRL and PEFT when it is imported, and must be imported before them.
The tests share one process, and some import transformers directly (the tokenizer tests), so the
import order is fixed here, once, before any test module is collected.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import unsloth  # noqa: E402, F401

from finetune.tiny_model import ensure_tiny_model  # noqa: E402


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir():
    return ensure_tiny_model()
