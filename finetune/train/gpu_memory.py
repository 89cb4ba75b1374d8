"""Peak GPU memory of a training loop, measured one way for the runner (training.py) and for the bare
Unsloth baseline it is compared with (benchmarks/bare_unsloth.py). It imports torch alone, so the
bare script can share it and still use nothing of the runner's training path.
"""

import gc

import torch


def reset_peak_memory() -> None:
    """Start the peak counters from what training itself holds. Garbage from loading, the samples
    before training and the probe is collected, and the allocator's cached blocks are given back
    first: otherwise the reserved peak would count the cache they left, and the allocated peak any
    tensor a reference cycle still holds. Nothing to do on the CPU."""
    if not torch.cuda.is_available():
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def read_peak_memory() -> tuple[int | None, int | None]:
    """(allocated, reserved) peak bytes since reset_peak_memory; (None, None) on the CPU."""
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
