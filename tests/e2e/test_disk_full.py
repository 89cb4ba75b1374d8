"""A full disk is one sentence naming what could not be written, the free space, the last sound
checkpoint and how to continue (exit 5); tried on a real small filesystem (a tmpfs)."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from finetune.run import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def small_disk(folder: Path, size_mib: int, free_mib: int):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("making a small filesystem (mount -t tmpfs) needs root, which this machine does not give")
    try:
        (folder / "filler").write_bytes(b"\0" * ((size_mib - free_mib) * 2**20))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def train_on(disk: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "runner.py", "recipes/smoke.yaml", f"output.dir={disk / 'runs'}", *overrides],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_disk_that_fills_at_the_first_checkpoint(tmp_path):
    with small_disk(tmp_path / "disk", 30, 3) as disk:
        out = train_on(disk, "train.max_steps=10")
        stderr = " ".join(out.stderr.split())
        assert out.returncode == 5 and "Traceback" not in out.stderr, out.stderr[-3000:]
        (run_dir,) = (disk / "runs" / "smoke").iterdir()
        assert (
            f"error: the disk is full: writing a checkpoint into {run_dir / 'checkpoints'} failed (" in stderr
        )
        assert "MiB free there); no checkpoint was saved; free some space and start the run again" in stderr
        assert latest_checkpoint(run_dir)[0] is None  # the half-written one stays unsealed


def test_a_disk_that_fills_later_names_the_last_sound_checkpoint_to_resume_from(tmp_path):
    with small_disk(tmp_path / "disk", 60, 30) as disk:
        out = train_on(disk, "train.max_steps=10", "train.save_steps=1", "train.save_total_limit=10")
        stderr = " ".join(out.stderr.split())
        assert out.returncode == 5 and "Traceback" not in out.stderr, out.stderr[-3000:]
        (run_dir,) = (disk / "runs" / "smoke").iterdir()
        kept = latest_checkpoint(run_dir)[0]
        assert kept is not None and f"the last sound checkpoint is {kept}" in stderr
        assert f"then: python runner.py resume {run_dir}" in stderr
