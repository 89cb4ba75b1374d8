"""Several processes under torchrun: which one this is, and the few collective steps a run needs.

torchrun (torch.distributed.run) starts one process per GPU and sets RANK, LOCAL_RANK and
WORLD_SIZE; transformers' Trainer, through accelerate, does the data-parallel training itself
(DDP: each rank its share of every global batch, the LoRA gradients all-reduced). This module adds
only what the run around the trainer needs: rank 0 alone prints and writes the run folder; the
prepared data are built once (rank 0 first, the others waiting their turn, see main_first); the
run folder's path goes from rank 0 to the others; a stop asked of one rank stops every rank at the
same step. Collectives time out, so a rank that died ends the job with an error instead of a hang;
waits that may rightly take longer (a build) and word that must pass without one (a rank that ran
out of memory) go through the job's rendezvous store instead.

Reading the environment needs no torch; only start() and the collectives import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

# How long a collective waits for a rank that stopped answering before the job ends with an error.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("FINETUNE_COLLECTIVE_TIMEOUT", "300")))
# Set by `--gpus` (lifecycle.torchrun): where a rank that ran out of memory says so, for its exit code.
OUT_OF_MEMORY_FILE = "FINETUNE_OUT_OF_MEMORY_FILE"


class PeerLost(Exception):
    """Another process of the job stopped (killed, crashed, out of memory): in the middle of a step
    of the run in ``run_dir``, or (no ``run_dir``) while the run was being prepared."""

    def __init__(self, run_dir: Path | None = None):
        here = f"rank {rank()} of {world_size()} here"
        if run_dir is None:
            super().__init__(
                f"another process of this torchrun job ({here}) stopped while the run was being "
                "prepared, so this one stops too; its error says why"
            )
            return
        super().__init__(
            f"another process of this torchrun job ({here}) stopped in the "
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
    signs = ("Connection closed by peer", "Connection reset by peer", "NCCL")
    # gloo says "Timed out waiting ...ms", NCCL's watchdog "... timed out".
    return isinstance(error, dist.DistError) or any(s in text for s in signs) or "timed out" in text.lower()


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
        torch.cuda.set_device(device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


def device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU this process trains on: its LOCAL_RANK, wrapped around the GPUs it can see, as
    Unsloth's loader (loader_utils._infer_local_rank) and accelerate (PartialState.set_device) place
    it. A launcher that gives each rank one GPU of its own (Slurm's --gpus-per-task) leaves one
    visible while LOCAL_RANK still counts the machine's processes."""
    if local_rank < 0:
        return 0
    return local_rank % visible_devices if 0 < visible_devices <= local_rank else local_rank


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


def _job_store():
    """The job's rendezvous store (torchrun's agent serves it): keys every rank reads and writes with
    no collective, so neither a wait on it nor a word left in it is bounded by COLLECTIVE_TIMEOUT."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _key(name: str) -> str:
    # A restarted job (torchrun --max-restarts) starts its keys afresh.
    return f"finetune/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def tell_out_of_memory(step: int) -> None:
    """Say, without a collective (the other ranks are in this step's, waiting for this one), that
    this rank ran out of memory at ``step``: once it has left, the others' failed step says so (see
    peer_out_of_memory) instead of "a process stopped", and `--gpus` exits 3."""
    if not active():
        return
    with contextlib.suppress(RuntimeError):  # no store to tell: the others say "a process stopped"
        _job_store().set(_key("out-of-memory"), f"{rank()} {step}")
    if os.environ.get(OUT_OF_MEMORY_FILE):
        Path(os.environ[OUT_OF_MEMORY_FILE]).write_text(f"{rank()} {step}\n")


def peer_out_of_memory() -> tuple[int, int] | None:
    """(rank, step) of the process of this job that ran out of memory (tell_out_of_memory), if one did."""
    with contextlib.suppress(RuntimeError):  # the store went with the job: nothing said
        store = _job_store()
        if store.check([_key("out-of-memory")]):
            peer, step = store.get(_key("out-of-memory")).decode().split()
            return int(peer), int(step)
    return None


_blocks = 0  # main_first blocks entered: every rank enters the same ones in the same order


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first; then the first process of each other machine (whose cache may
    be its own); then the rest of each machine, after its first, opening what was built instead of
    building it again.

    The turns are waited for on a key in the job's store, not in a barrier: building the data of
    a large data set takes longer than COLLECTIVE_TIMEOUT, and a barrier would end the job. A
    process that waits still stops with the job: torchrun ends it when another fails, and a first
    process whose block failed says so."""
    global _blocks
    if not active():
        yield
        return
    _blocks += 1
    waits_for, waited_for = _turn(rank(), int(os.environ.get("LOCAL_RANK", "0")))
    if waits_for is not None:
        _wait_for(_key(f"main-first/{_blocks}/{waits_for}"))
    if not waited_for:
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(RuntimeError):  # the store gone too: torchrun ends the others
            _job_store().set(_key(f"main-first/{_blocks}/{rank()}"), "failed")
        raise
    _job_store().set(_key(f"main-first/{_blocks}/{rank()}"), "done")


def _turn(global_rank: int, local_rank: int) -> tuple[int | None, bool]:
    """The rank whose main_first block this process waits for (None: none), and whether others wait
    for its own. torchrun numbers each machine's processes in a row: its first is rank - LOCAL_RANK."""
    if global_rank == 0:
        return None, True
    return (0, True) if local_rank == 0 else (global_rank - local_rank, False)


def _wait_for(key: str) -> None:
    """Until ``key`` is set, with no time limit (the store's own wait would print a warning at each
    of its time-outs); PeerLost when the block it waits for failed."""
    store = _job_store()
    while not store.check([key]):
        time.sleep(0.5)
    if store.get(key) == b"failed":
        raise PeerLost()
