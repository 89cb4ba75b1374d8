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
    # The probe's worst-case eval batch: its tokens and the reserved peak while it ran (None: none ran)
    eval_tokens: int | None = None
    eval_peak_reserved: int | None = None

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


def early_stop_step(
    evaluations: list[tuple[int, float]], patience: int, threshold: float = 0.0, greater: bool = False
) -> int | None:
    """The step at which early stopping ends a run that evaluated ``evaluations`` (step, metric), by
    transformers' EarlyStoppingCallback rule: an evaluation improves when it beats the best so far by
    more than ``threshold``; ``patience`` evaluations in a row that do not end it. None: it never does."""
    best, waited = None, 0
    for step, value in evaluations:
        better = best is None or (value > best if greater else value < best)
        if best is None or (better and abs(value - best) > threshold):
            waited = 0
        else:
            waited += 1
        if better:  # the best so far moves on any gain (transformers' best_metric)
            best = value
        if waited >= patience:
            return step
    return None


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint a run kept as its best (what adapter/ holds), and how the run ended."""

    metric: str  # transformers' name, e.g. eval_loss
    value: float
    step: int
    last_step: int  # the run's last step; its checkpoint stays in checkpoints/
    early_stopped: bool  # early stopping ended the run (before max_steps)
    patience: int | None = None
    threshold: float = 0.0

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "value": self.value,
            "step": self.step,
            "checkpoint": f"checkpoints/checkpoint-{self.step}",
            "last_step": self.last_step,
            "last_checkpoint": f"checkpoints/checkpoint-{self.last_step}",
            "early_stopped": self.early_stopped,
            "patience": self.patience,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, record: dict) -> BestCheckpoint:
        keys = ("metric", "value", "step", "last_step", "early_stopped", "patience", "threshold")
        return cls(**{key: record[key] for key in keys})

    def lines(self) -> list[str]:
        """What the console and report.md say of it."""
        said = [
            f"best checkpoint: step {self.step} ({self.metric} {self.value:.4f}), in adapter/; the last "
            f"step's is {self.as_dict()['last_checkpoint']}"
        ]
        if self.early_stopped:
            margin = f" by more than {self.threshold:g}" if self.threshold else ""
            said.append(
                f"early stopping ended the run at step {self.last_step}: {self.patience} evaluation"
                f"{'s' if self.patience != 1 else ''} in a row did not improve {self.metric} on the best "
                f"before them{margin}"
            )
        elif self.patience is not None:
            said.append(f"early stopping did not end the run ({self.metric} kept improving enough)")
        return said


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
    best: BestCheckpoint | None = None  # the best checkpoint, when the recipe keeps it


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
        evaluating: bool = False,  # in an evaluation (after step ``step``'s update, which is whole)
    ):

        self.rank = rank if rank is not None or not distributed.active() else distributed.rank()
        on = "" if self.rank is None else f" on rank {self.rank}"
        where = "in the probe" if step is None else f"at step {step}"
        if evaluating:
            where = "in the probe's evaluation" if step is None else f"in the evaluation after step {step}"
        super().__init__(f"out of memory{on} {where}")
        self.step, self.tokens, self.peak_reserved = step, tokens, peak_reserved
        self.checkpoint, self.unsaved, self.evaluating = checkpoint, unsaved, evaluating

    @classmethod
    def on_another_rank(cls) -> OutOfMemory | None:
        """The out-of-memory error another process of this torchrun job ended with, if that is why
        this one's step failed (distributed.tell_out_of_memory)."""

        found = distributed.peer_out_of_memory()
        if found is None:
            return None
        peer, step = found
        return cls(step, None, None, unsaved=f"rank {peer} ran out of memory", rank=peer)
