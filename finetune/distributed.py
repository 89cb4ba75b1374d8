"""Several processes under torchrun: which one this is, and the few collective steps a run needs.

torchrun (torch.distributed.run) starts one process per GPU and sets RANK, LOCAL_RANK and
WORLD_SIZE; transformers' Trainer, through accelerate, does the data-parallel training itself
(DDP: each rank its share of every global batch, the LoRA gradients all-reduced). This module adds
only what the run around the trainer needs: rank 0 alone prints and writes the run folder; the
prepared data and the tiny model are built once (rank 0 first, the others after a barrier); the
run folder's path goes from rank 0 to the others; a stop asked of one rank stops every rank at the
same step. Collectives time out, so a rank that died ends the job with an error instead of a hang.

Reading the environment needs no torch; only start() and the collectives import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from datetime import timedelta

# How long a collective waits for a rank that stopped answering before the job ends with an error.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("FINETUNE_COLLECTIVE_TIMEOUT", "300")))


class PeerLost(Exception):
    """Another process of the job stopped (killed, crashed, out of memory) in the middle of a step."""

    def __init__(self, run_dir):
        super().__init__(
            f"another process of this torchrun job (rank {rank()} of {world_size()} here) stopped in the "
            f"middle of a step, so this one stops too (torchrun's report names it); the run is in "
            f"{run_dir}: continue it from its last checkpoint with as many processes: "
            f"torchrun --nproc_per_node {world_size()} runner.py resume {run_dir}"
        )


def lost_a_peer(error: BaseException) -> bool:
    """Whether a failed collective means another rank went away (gloo, NCCL and torch's own words)."""
    if not active():
        return False
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in text
        for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL", "timed out")
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Whether this process is one of several."""
    return world_size() > 1


def start() -> None:
    """Join the job's process group (NCCL between GPUs, gloo on the CPU) with a bounded timeout,
    each process on its own GPU. The trainer (accelerate) uses this group instead of making one."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _stop_with_torchrun()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


def _stop_with_torchrun() -> None:
    """torchrun starts each process in a session of its own, so a `kill -9` of torchrun alone would
    leave them training on, orphaned. On Linux the kernel sends this process SIGTERM when its
    parent dies: it stops at the end of the step with a checkpoint, as on Ctrl-C."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # torchrun died before this was set
        os.kill(os.getpid(), signal.SIGTERM)


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def from_main(value):
    """Rank 0's ``value``, on every rank (a path, a small record)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop asked of one stops all at the same step)."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first; then the first process of each other machine (whose cache may
    be its own); then the rest, which open what was built instead of building it again."""
    turn = 0 if is_main() else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    for _ in range(turn):
        barrier()
    yield
    for _ in range(2 - turn):
        barrier()
