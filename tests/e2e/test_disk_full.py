"""A full disk is one sentence naming what could not be written, the free space, the last sound
checkpoint and how to continue (exit 5); tried on a real small filesystem (a tmpfs)."""

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import run_cli, runner

from finetune.runs.run_folder import latest_checkpoint

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
    return runner("recipes/smoke.yaml", f"output.dir={disk / 'runs'}", *overrides)


def test_a_disk_too_small_for_the_run_is_refused_before_anything_is_made(tmp_path):
    with small_disk(tmp_path / "disk", 30, 3) as disk:
        out = train_on(disk, "train.max_steps=10")
        stderr = " ".join(out.stderr.split())
        assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert f"FAIL disk in {disk / 'runs'} (the run's files): 0.07 GiB (free 0.00 GiB)" in out.stdout
        assert "free 0.07 GiB there, or set output.dir to a folder on a larger disk" in stderr
        assert "Nothing was loaded or trained; --force launches anyway." in stderr
        assert not (disk / "runs").exists()


def test_a_disk_that_fills_at_the_first_checkpoint(tmp_path):
    with small_disk(tmp_path / "disk", 30, 3) as disk:
        out = train_on(disk, "train.max_steps=10", "--force")
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
        out = train_on(
            disk, "train.max_steps=10", "train.save_steps=1", "train.save_total_limit=10", "--force"
        )
        stderr = " ".join(out.stderr.split())
        assert out.returncode == 5 and "Traceback" not in out.stderr, out.stderr[-3000:]
        (run_dir,) = (disk / "runs" / "smoke").iterdir()
        kept = latest_checkpoint(run_dir)[0]
        assert kept is not None and f"the last sound checkpoint is {kept}" in stderr
        assert f"then: python runner.py resume {run_dir}" in stderr


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_the_disk_plan_is_what_the_run_wrote(finished_run):
    """plan.json's disk prediction against the files the finished run left: each checkpoint within
    10%, and the whole folder no larger than predicted at its fullest (2 checkpoints written, both
    kept: the fullest is the end)."""
    disk = json.loads((finished_run / "plan.json").read_text())["disk"]
    checkpoints = sorted((finished_run / "checkpoints").glob("checkpoint-*"))
    assert disk["checkpoints_at_once"] == len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert folder_bytes(checkpoint) == pytest.approx(disk["checkpoint_bytes"], rel=0.10)
    assert 0.9 * disk["run_total_bytes"] <= folder_bytes(finished_run) <= disk["run_total_bytes"]


def test_export_onto_a_disk_too_small_for_the_merge_is_refused_before_loading(tmp_path, finished_run):
    with small_disk(tmp_path / "disk", 60, 40) as disk:
        out = run_cli("export", str(finished_run), "--out", str(disk / "merged"))
        message = " ".join(out.stderr.split())
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        refusal = f"error: export: not enough disk for the merged model in {disk / 'merged'}: 0.08 GiB"
        assert refusal in message and "GiB needed there, 0.04 GiB free" in message
        assert "heavy imports: []" in out.stdout and not (disk / "merged").exists()


def test_a_disk_that_fills_during_export_leaves_no_half_merged_model(
    tmp_path, finished_run, monkeypatch, capfd
):
    """The check passed, then the disk filled (another process, a wrong estimate): the real ENOSPC
    from safetensors is one sentence, exit 5, and the partial folder is gone so export can rerun."""
    from finetune.cli import commands
    from finetune.export import merging

    monkeypatch.setattr(merging, "check_room", lambda recipe, base, out, need=None: None)
    with small_disk(tmp_path / "disk", 60, 40) as disk:
        code = commands.main(["export", str(finished_run), "--out", str(disk / "merged")])
        message = " ".join(capfd.readouterr().err.split())
        assert code == 5 and not (disk / "merged").exists(), message
        assert f"error: the disk is full: writing the merged model into {disk / 'merged'} failed (" in message
        assert f"nothing of the run changed and nothing was left in {disk / 'merged'}; free some" in message
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no staging folder, no lock
    assert (finished_run / "adapter" / "adapter_model.safetensors").is_file()  # the run is untouched
