"""Experiment trackers without a network: a smoke run logging to W&B (offline) and MLflow (its local
SQLite store) is killed with SIGKILL after a checkpoint and resumed; each tracker keeps one tracker
run whose losses equal the run's own log, and no secret reaches the run folder."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import runner

from finetune.plan.trackers import TRACKERS_FILE
from finetune.runs.run_folder import SEAL

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "WANDB_API_KEY": "wandb_plantedSecretKey0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflow_plantedToken98765",
}


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (RUN/wandb/offline-run-*/run-ID.wandb): a W&B
    header, then LevelDB's log format (32 KiB blocks of records, each a 7-byte header: CRC,
    length, type; types 1 full, 2 first, 3 middle, 4 last) holding wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, header, pos, chunks, rows = 32 * 1024, 7, 7, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload = data[pos + header : pos + header + length]
        pos += header + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_offline_and_mlflow_keep_every_step_across_a_kill_and_resume(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "WANDB_MODE": "offline",
        **SECRETS,
    }
    for name in (
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        env.pop(name, None)
    output = tmp_path / "runs"
    command = [
        sys.executable,
        "runner.py",
        "recipes/smoke.yaml",
        "train.max_steps=8",
        "train.save_steps=4",
        "output.report_to=[tensorboard,wandb,mlflow]",
        f"output.dir={output}",
    ]
    run = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sealed = output / "smoke"
    deadline = time.monotonic() + 300
    while not list(sealed.glob(f"*/checkpoints/checkpoint-4/{SEAL}")):
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint-4 in 300 s"
        time.sleep(0.1)
    run.send_signal(signal.SIGKILL)
    run.wait()
    (run_dir,) = sealed.iterdir()
    assert not (run_dir / "adapter").exists()
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())

    resumed = runner("resume", str(run_dir), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = {
        entry["step"]: entry["loss"]
        for entry in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
        if "loss" in entry
    }
    assert sorted(losses) == list(range(1, 9))

    # MLflow: one run in the recipe's experiment, in the store beside the runs, every step's loss.
    from mlflow.tracking import MlflowClient

    assert ids["mlflow_tracking_uri"] == f"sqlite:///{(output / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=ids["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("smoke")
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_id == ids["mlflow_run_id"] and only.info.run_name == run_dir.name
    history = {m.step: m.value for m in client.get_metric_history(only.info.run_id, "loss")}
    assert history == pytest.approx(losses, rel=1e-6)

    # W&B: each process wrote an offline-run folder, both under the run's id, so `wandb sync` uploads
    # one run. The resumed process logged every step it trained. What the killed one logged is gone:
    # wandb-core writes its file a 32 KiB block at a time, and SIGKILL took the unwritten block (its
    # file holds the 7-byte header only); MLflow, TensorBoard and log.jsonl kept those steps.
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_dir.name}.wandb"}
    assert ids["wandb_run_id"] == run_dir.name and ids["wandb_project"] == "smoke"
    logged = {
        row["train/global_step"]: row["train/loss"] for row in wandb_history(files[-1]) if "train/loss" in row
    }
    assert logged == pytest.approx({step: losses[step] for step in range(5, 9)}, rel=1e-6)

    # Keys stay in the environment: nothing under output.dir holds one (the run folder, W&B's files,
    # the MLflow store).
    for path in output.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(secret.encode() in content for secret in SECRETS.values()), path
