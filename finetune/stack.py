"""The training stack, imported the one way that works; every heavy module imports this first.

Unsloth patches transformers, TRL and PEFT when it is imported, so it must come before them. Two of
its defaults are set here, before that import, because it reads them only then:
- it downloads a statistics file from the hub at every model load on a GPU (a hung hub costs 120 s,
  then aborts the load): never, here;
- it writes the kernels and trainer classes it generates on a GPU into ./unsloth_compiled_cache,
  wherever the user happens to run from: under our cache folder instead.
A user's own setting of either wins.
"""

import os

from finetune.tiny_model import cache_root

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(cache_root() / "unsloth_compiled_cache"))

import unsloth  # noqa: E402, F401
