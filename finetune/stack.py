"""The training stack, imported the one way that works; every heavy module imports this first.

Unsloth patches transformers, TRL and PEFT when it is imported, so it must come before them. Two of
its defaults are set here, before that import, because it reads them only then:
- it downloads a statistics file from the hub at every model load on a GPU (a hung hub costs 120 s,
  then aborts the load): never, here;
- it writes the kernels and trainer classes it generates on a GPU into ./unsloth_compiled_cache,
  wherever the user happens to run from: under our cache folder instead.
A user's own setting of either wins.

Unsloth decides its device when imported and refuses (NotImplementedError) a machine where an NVIDIA
driver is loaded but torch cannot use the GPU, rather than fall back to the CPU: that is one
sentence here, a UserError, raised before any run folder is made (launch.load_training_stack).
"""

import os
from pathlib import Path

from finetune.recipe import UserError
from finetune.tiny_model import cache_root

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
        "driver or install the torch build for the CUDA version the driver supports; to train a small "
        "model on the CPU, hide the GPU with CUDA_VISIBLE_DEVICES=''."
    ) from None
