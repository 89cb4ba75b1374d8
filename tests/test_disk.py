"""Disk planned like memory: what a run writes, where, against the free space there (no torch).
tests/e2e/test_disk_full.py holds the prediction to what a real run wrote, and a real small disk."""

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from finetune.models.shapes import Shapes, shipped_config
from finetune.plan import disk
from finetune.plan import job as job_module
from finetune.plan.constants import GIB
from finetune.plan.job import plan_job
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent
FLAGSHIP = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"


def recipe(name: str, *overrides: str):
    return load_recipe(ROOT / "recipes" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize(
    ("total", "save_steps", "written"),
    [(30, None, 10), (25, None, 9), (30, 7, 5), (30, 30, 1), (3, None, 3)],
)
def test_checkpoints_follow_transformers_save_schedule(total, save_steps, written):
    """Every save_steps (10% of training, rounded up, when unset) and once more at the end."""
    extra = [f"train.save_steps={save_steps}"] if save_steps else []
    assert disk.checkpoints_written(recipe("smoke", *extra), total) == written


def test_a_flagship_checkpoint_is_its_fp32_adapter_optimizer_state_and_tokenizer():
    shapes = Shapes.from_config(shipped_config(FLAGSHIP))
    code_gen = recipe("code-gen")
    plan = disk.predict_disk(code_gen, shapes, 1000, True, None, 0, 8_030_261_248)
    trainable = 83_886_080  # r=32 on all seven projections of 32 layers
    tensors = 32 * 7 * 2
    adapter = 4 * trainable + 512 * tensors
    optimizer = (2 + 8 / 256) * trainable + 2 * 512 * tensors  # adamw_8bit: a byte a moment + absmax
    assert code_gen.train.optim == "adamw_8bit"
    small = disk.CHECKPOINT_SMALL_FILES_BYTES + 1000 * disk.BYTES_PER_STEP
    assert plan.checkpoint_bytes == adapter + optimizer + disk.LLAMA3_TOKENIZER_BYTES + small
    assert plan.checkpoints_at_once == code_gen.train.save_total_limit + 1  # the new one, then rotation
    merged = 2 * 8_030_261_248 + disk.LLAMA3_TOKENIZER_BYTES + disk.MERGED_SMALL_FILES_BYTES
    assert plan.export_bytes == merged


def test_a_download_counts_where_it_lands():
    plan = disk.DiskPlan(1, 1, {"files": 2 * GIB}, 5 * GIB, 15 * GIB)
    same = disk.Place("runs", 6 * GIB, 1)
    verdicts, _ = disk.disk_verdicts(plan, same, disk.Place("cache", 6 * GIB, 1))
    assert [v.line() for v in verdicts] == [
        "FAIL disk in runs (the run's files and the base model's download): 7.00 GiB (free 6.00 GiB)"
    ]
    verdicts, notes = disk.disk_verdicts(plan, same, disk.Place("cache", 4 * GIB, 2))
    assert [v.line() for v in verdicts] == [
        "PASS disk in runs (the run's files): 2.00 GiB (free 6.00 GiB)",
        "FAIL disk in cache (the base model's download): 5.00 GiB (free 4.00 GiB)",
    ]
    # Not a gate, so not a FAIL: a note, saying whether there will be room and what else to do.
    assert notes == [
        "note: a later export into the run folder needs 15.00 GiB; 4.00 GiB will be free after training "
        "(not enough: `export --out` can write elsewhere)"
    ]


Usage = namedtuple("Usage", "total used free")


def test_plan_refuses_a_run_the_disk_cannot_hold_and_says_what_would_fit(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, 40 * 2**20))
    smoke = recipe("smoke", "train.save_steps=1", "train.save_total_limit=5")
    job = plan_job(smoke, "recipes/smoke.yaml")
    assert job.over_budget and job.budget.ok  # memory fits; the disk does not
    assert job.disk.plan.checkpoints_at_once == 6
    (line,) = [line for line in job.lines() if line.startswith("FAIL disk in runs")]
    assert line.endswith("(free 0.04 GiB)")
    assert job.suggestions[0].endswith("GiB there, or set output.dir to a folder on a larger disk")
    assert job.suggestions[1].startswith("train.save_total_limit=1 (2 checkpoints at once instead of 6: ")
    document = job_module.plan_document(job, job.suggestions)
    assert document["disk"]["verdicts"][0]["ok"] is False
    assert document["disk"]["checkpoint_bytes"] == job.disk.plan.checkpoint_bytes

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, 100 * GIB))
    assert not plan_job(smoke, "recipes/smoke.yaml").over_budget
