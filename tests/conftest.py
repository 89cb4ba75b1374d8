"""Shared test setup for both tiers.

The fast tier (every test outside tests/e2e) checks the light modules: recipes, schedules, budgets,
data, the light CLI verbs. It must not import the training stack: in a session that collected no
end-to-end test, a test that imports torch, unsloth, transformers, trl or peft fails by name (which
would also mean `plan` and `validate` had become slow). tests/e2e/conftest.py sets up the stack.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# CI's verdict must depend on the code, not on the draw: the default profile replays the same
# examples every run. `make fuzz` explores fresh ones, many more of them.
settings.register_profile("ci", derandomize=True, max_examples=300)
settings.register_profile("explore", derandomize=False, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402

HEAVY = ("torch", "unsloth", "transformers", "trl", "peft")
E2E = "tests/e2e/"
_only_fast_tier = True  # no end-to-end test collected in this process


def pytest_collection_modifyitems(config, items):
    global _only_fast_tier
    _only_fast_tier = not any(E2E in item.path.as_posix() for item in items)


@pytest.fixture(autouse=True)
def _fast_tier_leaves_the_training_stack_alone(request):
    """A fast-tier test that imports the training stack fails, named: in a run of the fast tier
    alone, nothing else has imported it."""
    before = {name for name in HEAVY if name in sys.modules}
    yield
    if _only_fast_tier and E2E not in request.node.path.as_posix():
        imported = [name for name in HEAVY if name in sys.modules and name not in before]
        assert not imported, f"the fast tier imported {', '.join(imported)}; move this test to tests/e2e"


@pytest.fixture
def fresh_cache(tmp_path):
    """An empty FINETUNE_CACHE but for the converted Llama 3 tokenizer (a link to the usual cache's,
    converted there once): a test that needs a cache of its own need not pay the conversion again."""
    from finetune.data.tokenize import llama3_tokenizer_dir

    shared = llama3_tokenizer_dir()  # in the usual cache
    cache = tmp_path / "fresh-cache"
    cache.mkdir()
    (cache / shared.name).symlink_to(shared, target_is_directory=True)
    return cache
