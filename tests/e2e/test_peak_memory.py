"""Peak memory is measured one way, by the runner and by benchmarks/bare_unsloth.py it is compared with
(finetune/train/gpu_memory.py): what loading, the samples before training and the probe left (garbage, and
the allocator's cached blocks) is freed before the peak counters are reset, so that it is not counted
in budget.json, the smoke bands or the fitted allocator overhead. On the CPU, by recording the calls."""

import gc
from pathlib import Path

import pytest
import torch

from finetune.train import gpu_memory, training

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """The CUDA memory calls made, in order, as if on a GPU."""
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "collect", lambda *args: made.append("gc.collect") or 0)
    for name, value in [
        ("empty_cache", None),
        ("reset_peak_memory_stats", None),
        ("max_memory_allocated", 1),
        ("max_memory_reserved", 2),
    ]:
        monkeypatch.setattr(torch.cuda, name, lambda *args, n=name, v=value: made.append(n) or v)
    return made


class _Trainer:
    """What train._timed_train uses of a trainer; train() records itself among the calls."""

    def __init__(self, calls):
        self.calls = calls

    def add_callback(self, callback):
        pass

    def remove_callback(self, callback):
        pass

    def train(self, resume_from_checkpoint=None):
        self.calls.append("train")


def test_the_runner_frees_what_loading_left_before_resetting_the_peak_and_reads_it_after(calls):
    measured = training._timed_train(_Trainer(calls))
    assert calls == [
        "gc.collect",
        "empty_cache",
        "reset_peak_memory_stats",
        "train",
        "max_memory_allocated",
        "max_memory_reserved",
    ]
    assert (measured.peak_allocated, measured.peak_reserved) == (1, 2)


def test_nothing_is_called_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: pytest.fail("reset on the CPU"))
    gpu_memory.reset_peak_memory()
    assert gpu_memory.read_peak_memory() == (None, None)


def test_the_bare_script_measures_with_the_same_functions_and_nothing_else_resets_the_counters():
    bare = (ROOT / "benchmarks" / "bare_unsloth.py").read_text()
    start, loop, read = (
        bare.index(s) for s in ("reset_peak_memory()", "trainer.train()", "read_peak_memory()")
    )
    assert start < loop < read
    others = [*(ROOT / "finetune").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    resetting = [p.name for p in others if "reset_peak_memory_stats" in p.read_text()]
    assert resetting == ["gpu_memory.py"]
