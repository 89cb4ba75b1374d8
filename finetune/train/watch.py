"""Watching the loss and gradient norm as a run goes (pure Python, no torch).

A NaN or infinite loss or gradient norm, or a gradient norm far above its running median, is a
step gone bad; ``patience`` bad logged steps in a row stop the run, which then keeps the checkpoint
saved before the first of them. A loss well above the running median of the losses before it is a
spike: a warning, logged and listed in the report, but training goes on.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

EXPLODING_FACTOR = 100.0  # a gradient norm this many times its running median is exploding
SPIKE_FACTOR = 2.0  # a loss this many times the running median of the losses before it is a spike
WINDOW = 20  # logged steps in the running medians
MIN_HISTORY = 5  # logged steps before medians are trusted


@dataclass
class Watch:
    patience: int
    grad_norm_limit: float | None = None  # None: EXPLODING_FACTOR x the running median
    losses: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    norms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    bad: list[tuple[int, str]] = field(default_factory=list)  # the current run of bad steps
    spikes: list[dict] = field(default_factory=list)
    last_good_step: int = 0
    # A spike is a loss well above its usual, positive, level, and an exploding gradient one far
    # above its usual norm: GRPO has neither scale (its loss is advantage-weighted, around 0 either
    # side; a step whose groups all scored alike has no gradient, the next one a full one), so its
    # runs watch for NaN and infinity, and for a norm above grad_norm_limit when the recipe sets one.
    running_scales: bool = True

    def observe(self, step: int, loss: float | None, grad_norm: float | None) -> str | None:
        """Take one logged step; the reason to stop the run, or None to go on."""
        problem = self._problem(loss, grad_norm)
        if problem is None:
            self.bad.clear()
            self.last_good_step = step
            if loss is not None:
                self._check_spike(step, loss)
                self.losses.append(loss)
            if grad_norm is not None:
                self.norms.append(grad_norm)
            return None
        self.bad.append((step, problem))
        if len(self.bad) < self.patience:
            return None
        first, reason = self.bad[0]
        return (
            f"{reason} at step {first}"
            + (f", and {len(self.bad) - 1} more bad steps in a row" if len(self.bad) > 1 else "")
            + f"; the last good step was {self.last_good_step}"
        )

    def is_bad(self) -> bool:
        """Whether the latest step was bad (no checkpoint is taken of a bad state)."""
        return bool(self.bad)

    def _problem(self, loss: float | None, grad_norm: float | None) -> str | None:
        if loss is not None and not math.isfinite(loss):
            return f"the loss is {loss}"
        if grad_norm is None:
            return None
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        limit = self.grad_norm_limit
        if limit is None and self.running_scales and len(self.norms) >= MIN_HISTORY:
            limit = EXPLODING_FACTOR * statistics.median(self.norms)
        if limit is not None and grad_norm > limit:
            return f"the gradient norm {grad_norm:.3g} is above {limit:.3g}"
        return None

    def _check_spike(self, step: int, loss: float) -> None:
        if not self.running_scales or len(self.losses) < MIN_HISTORY:
            return
        median = statistics.median(self.losses)
        if median > 0 and loss > SPIKE_FACTOR * median:
            self.spikes.append({"step": step, "loss": loss, "running_median": median})
