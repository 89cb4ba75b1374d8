"""How the training stack is imported (finetune/train/stack.py): Unsloth set up before it reads its
settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json
import finetune.train.training  # what `runner.py train` imports
from unsloth.models import _utils
from unsloth_zoo import compiler

calls = []
_utils._get_statistics = lambda *a, **k: calls.append(a)  # the hub download it would make
_utils.get_statistics()  # what every GPU model load calls
print(json.dumps({"compile_location": compiler.UNSLOTH_COMPILE_LOCATION, "statistics_calls": len(calls)}))
"""


def test_unsloth_never_calls_the_hub_for_statistics_and_compiles_into_our_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_")}
    env.pop("HF_HUB_OFFLINE", None)  # online, as a user's machine is: only our setting stops the call
    env.pop("TRANSFORMERS_OFFLINE", None)
    env["FINETUNE_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {
        "compile_location": str(tmp_path / "cache" / "unsloth_compiled_cache"),
        "statistics_calls": 0,
    }


def test_no_xformers_is_installed_and_unsloth_attends_with_pytorchs_sdpa():
    """No xformers release loads beside torch 2.14.1 + CUDA 13 (requirements.txt says why): left out,
    Unsloth imports it as absent (no warning on a GPU) and picks PyTorch's scaled-dot-product attention."""
    import importlib.util

    from unsloth.models import _utils
    from unsloth.utils import attention_dispatch

    assert importlib.util.find_spec("xformers") is None
    assert _utils.xformers is None and attention_dispatch.HAS_XFORMERS is False
    assert attention_dispatch.select_attention_backend() == attention_dispatch.SDPA
    assert attention_dispatch.select_attention_backend(use_varlen=True) == attention_dispatch.SDPA
    assert "xformers" not in (ROOT / "requirements.txt").read_text().split("# No xformers")[0]
