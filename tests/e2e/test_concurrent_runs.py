"""Two trainings of one recipe started at the same moment each get a folder of their own and both
finish; a resume of a run that is still training is refused (the run's lock), not run twice into
the same folder."""

import os
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import runner

from finetune.runs.run_folder import SEAL

ROOT = Path(__file__).resolve().parents[2]


def test_two_runs_at_once_and_no_resume_of_a_running_run(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "FINETUNE_CACHE": str(tmp_path / "cache"),
    }
    command = [
        sys.executable,
        "runner.py",
        "recipes/smoke.yaml",
        "train.max_steps=8",  # 6 steps left after the first checkpoint, for the resume's refusal
        "train.save_steps=2",
        f"output.dir={tmp_path / 'runs'}",
    ]
    runs = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    ]
    runs.append(
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
    deadline = time.monotonic() + 600
    while not (sealed := list((tmp_path / "runs").glob(f"smoke/*/checkpoints/checkpoint-*/{SEAL}"))):
        assert all(run.poll() is None for run in runs), [run.communicate()[1][-2000:] for run in runs]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    running = sealed[0].parents[2]
    resumed = runner("resume", str(running), env=env)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"{running} is still being trained (process " in resumed.stderr
    for run in runs:
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-3000:]
    folders = sorted((tmp_path / "runs" / "smoke").iterdir())
    assert len(folders) == 2 and folders[0].name != folders[1].name
    for folder in folders:
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert len((folder / "log.jsonl").read_text().splitlines()) >= 8
    # One prepared-data store for both (see tests/test_store.py for building it once).
    assert len(list((tmp_path / "cache" / "prepared").glob("*/summary.json"))) == 1
