"""Shared test setup.

Unsloth patches transformers, TRL and PEFT when it is imported, and must be imported before them.
The tests share one process, and some import transformers directly (the tokenizer tests), so the
import order is fixed here, once, before any test module is collected.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI's verdict must depend on the code, not on the draw: the default profile replays the same
# examples every run. `make fuzz` explores fresh ones, many more of them.
settings.register_profile("ci", derandomize=True, max_examples=300)
settings.register_profile("explore", derandomize=False, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
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
