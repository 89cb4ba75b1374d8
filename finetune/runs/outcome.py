"""How a training run came out: what it measured (Measured), what it ended with (TrainResult), and
the one way it can end without finishing that the caller must report (OutOfMemory). No torch."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from finetune.base import distributed


@dataclass
class Measured:
    """What a run (or a probe) really used: the numbers predictions are checked against."""

    step_seconds: list[float]  # wall time of every optimizer step
    peak_allocated: int | None  # bytes, PyTorch's CUDA allocator; None on the CPU
    peak_reserved: int | None
    # Where this process began: the step and trained tokens a resume started from (0 for a new run)
    first_step: int = 0
    first_tokens: int = 0

    @property
    def median_step_seconds(self) -> float | None:
        """Median after warm-up (the first two steps compile kernels and fill caches)."""
        steady = self.step_seconds[2:] or self.step_seconds
        return statistics.median(steady) if steady else None

    def as_dict(self) -> dict:
        return {
            "median_step_seconds": self.median_step_seconds,
            "step_seconds": self.step_seconds,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
        }


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    adapter_dir: Path
    log_history: list[dict]
    measured: Measured
    interrupted_by: str | None = None  # the signal that stopped the run early, after a checkpoint
    diverged: str | None = None  # why the watchdog stopped the run (finetune.train.watch)
    spikes: list[dict] = field(default_factory=list)  # loss spikes, warned of as they happened


class OutOfMemory(Exception):
    """The GPU ran out of memory: where (the probe or step ``step`` of training; under torchrun, on
    ``rank``, this process's unless given), the micro-batch's tokens, the allocator's peak
    (``peak_reserved``, torch.cuda.max_memory_reserved), and what was saved (``checkpoint``) or why
    nothing was (``unsaved``)."""

    def __init__(
        self,
        step: int | None,
        tokens: int | None,
        peak_reserved: int | None,
        checkpoint: Path | None = None,
        unsaved: str | None = None,
        rank: int | None = None,
    ):

        self.rank = rank if rank is not None or not distributed.active() else distributed.rank()
        on = "" if self.rank is None else f" on rank {self.rank}"
        super().__init__(f"out of memory{on} " + ("in the probe" if step is None else f"at step {step}"))
        self.step, self.tokens, self.peak_reserved = step, tokens, peak_reserved
        self.checkpoint, self.unsaved = checkpoint, unsaved

    @classmethod
    def on_another_rank(cls) -> OutOfMemory | None:
        """The out-of-memory error another process of this torchrun job ended with, if that is why
        this one's step failed (distributed.tell_out_of_memory)."""

        found = distributed.peer_out_of_memory()
        if found is None:
            return None
        peer, step = found
        return cls(step, None, None, unsaved=f"rank {peer} ran out of memory", rank=peer)
