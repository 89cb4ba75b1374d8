"""The run folder over a run's life: manifest, sealed checkpoints, exact resume after SIGKILL, a clean
stop on Ctrl-C or SIGTERM, refusal to resume changed inputs, and no secret written anywhere."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import runner

from finetune.runs.report import write_report
from finetune.runs.run_folder import SEAL, checkpoint_problem, latest_checkpoint, redact, seal_checkpoint
from finetune.train.watch import Watch

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_plantedSecretToken0123456789"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "HF_TOKEN": SECRET}


def start(*args, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "runner.py", *args, f"output.dir={output}"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_folder(output: Path) -> Path:
    (run_dir,) = (output / "smoke").iterdir()
    return run_dir


def wait_for(condition, process: subprocess.Popen, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def logged(run_dir: Path, key: str) -> dict[int, float]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {entry["step"]: entry[key] for entry in entries if key in entry}


def resume(run_dir: Path, *flags) -> subprocess.CompletedProcess:
    return runner("resume", str(run_dir), *flags, env=ENV)


def test_a_run_killed_with_sigkill_resumes_to_the_same_loss_at_every_step(tmp_path):
    recipe = ["recipes/smoke.yaml", "train.max_steps=8", "train.save_steps=4"]
    whole = start(*recipe, output=tmp_path / "whole")
    assert whole.wait() == 0, whole.communicate()[1][-3000:]
    killed = start(*recipe, output=tmp_path / "killed")
    wait_for(lambda: list((tmp_path / "killed").glob(f"smoke/*/checkpoints/checkpoint-4/{SEAL}")), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = run_folder(tmp_path / "killed")
    assert not (run_dir / "adapter").exists()  # it really died mid-training

    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    # Its time and speed are this process's part, said as such: steps 5 to 8, and their tokens.
    done = next(line for line in resumed.stdout.splitlines() if line.startswith("Done: "))
    assert done.startswith("Done: 8 steps (from step 4 on in this process) in "), done
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    seen = {
        entry["step"]: entry["num_input_tokens_seen"] for entry in history if "num_input_tokens_seen" in entry
    }
    speed = re.search(
        r"^steps: 8 \(from step 4 on in this process\) in ([\d.]+) s, (\d+) trained", resumed.stdout, re.M
    )
    assert speed, resumed.stdout
    assert int(speed.group(2)) == pytest.approx((seen[8] - seen[4]) / float(speed.group(1)), rel=0.05, abs=1)
    expected = run_folder(tmp_path / "whole")
    # Bit for bit on this CPU: every step's loss and LR, before and after the kill.
    assert logged(run_dir, "loss") == logged(expected, "loss") and len(logged(run_dir, "loss")) == 8
    assert logged(run_dir, "learning_rate") == logged(expected, "learning_rate")
    planned = json.loads((run_dir / "plan.json").read_text())["lr_per_step"]
    assert list(logged(run_dir, "learning_rate").values()) == pytest.approx(planned, rel=1e-12)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # What the run folder explains, and what it must never hold.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["packages"]["unsloth"] == "2026.10.9" and manifest["project_commit"]
    assert {"tokenizer", "prepared data", f"data {ROOT}/data_samples/code_chat.jsonl"} <= set(
        manifest["fingerprints"]
    )
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for folder in (run_dir, expected):
        for path in folder.rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_ctrl_c_saves_a_checkpoint_and_a_changed_input_stops_the_resume(tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(ROOT / "data_samples" / "code_chat.jsonl", data)
    # 10 steps, not the recipe's 30: the forced resume trains the rest of them.
    run = start("recipes/smoke.yaml", f"data.train={data}", "train.max_steps=10", output=tmp_path)
    wait_for(lambda: (tmp_path / "smoke").is_dir() and len(logged_or_empty(tmp_path)) >= 2, run)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    run_dir = run_folder(tmp_path)
    stopped = max(logged(run_dir, "loss"))
    assert stopped < 10 and "Traceback" not in stderr
    assert f"stopped after step {stopped} with a checkpoint" in stderr
    assert f"continue with: python runner.py resume {run_dir}" in stderr
    checkpoint, skipped = latest_checkpoint(run_dir)
    assert checkpoint.name == f"checkpoint-{stopped}" and skipped == []

    recipe_file = run_dir / "recipe.yaml"
    original = recipe_file.read_text()
    recipe_file.write_text(original.replace("learning_rate: 0.01", "learning_rate: 0.02"))
    edited = resume(run_dir)
    assert edited.returncode == 2 and "recipe: was " in edited.stderr
    recipe_file.write_text(original)

    data.write_text(data.read_text().replace("def ", "def  ", 1))
    refused = resume(run_dir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "the inputs changed since the run started" in refused.stderr
    assert f"data {data}: was " in refused.stderr and "--force resumes anyway" in refused.stderr
    forced = resume(run_dir, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert f"warning: --force: resuming although data {data}: was " in forced.stderr
    assert max(logged(run_dir, "loss")) == 10 and (run_dir / "report.md").is_file()
    # The report records the interruption and the resume, and what the plan warned of.
    report = (run_dir / "report.md").read_text()
    history = report.split("## History")[1].split("##")[0]
    events = [line.split(": ", 1)[1] for line in history.strip().splitlines()]
    assert events == [
        "started at step 0",
        f"interrupted by SIGINT after step {stopped}",
        f"resumed from checkpoint-{stopped}",
        "finished at step 10",
    ]
    warnings = report.split("## Warnings")[1].split("##")[0]
    assert "learning_rate 0.01 is far outside the usual LoRA range" in warnings


def test_sigterm_also_stops_with_a_checkpoint(tmp_path):
    run = start("recipes/smoke.yaml", output=tmp_path)
    wait_for(lambda: (tmp_path / "smoke").is_dir() and len(logged_or_empty(tmp_path)) >= 1, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    run_dir = run_folder(tmp_path)
    stopped = max(logged(run_dir, "loss"))
    assert run.returncode == 130 and f"SIGTERM: stopped after step {stopped} with a checkpoint" in stderr
    assert latest_checkpoint(run_dir)[0].name == f"checkpoint-{stopped}"


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run = start("recipes/smoke.yaml", output=tmp_path)
    wait_for(lambda: (tmp_path / "smoke").is_dir() and len(logged_or_empty(tmp_path)) >= 1, run)
    lines = []

    def read_stdout():
        for line in run.stdout:
            lines.append(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    run.send_signal(signal.SIGINT)
    # The second Ctrl-C goes as soon as the first was handled, well inside the step and its
    # checkpoint; a fixed sleep raced the step's end (the run could finish its clean stop first).
    wait_for(lambda: any("saving a checkpoint after this step" in line for line in lines), run, 60)
    run.send_signal(signal.SIGINT)
    run.wait(timeout=60)
    stderr = run.stderr.read()
    assert run.returncode == 130 and "interrupted" in stderr and "stopped after step" not in stderr


def test_a_second_sigterm_does_not_cut_the_checkpoint(tmp_path):
    """Only a person's second Ctrl-C means "now": a SIGTERM that comes again (torchrun's workers can
    get the parent-death signal and another) still ends with the checkpoint the first asked for."""
    run = start("recipes/smoke.yaml", output=tmp_path)
    wait_for(lambda: (tmp_path / "smoke").is_dir() and len(logged_or_empty(tmp_path)) >= 1, run)
    lines = []

    def read_stdout():
        for line in run.stdout:
            lines.append(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    run.send_signal(signal.SIGTERM)
    wait_for(lambda: any("saving a checkpoint after this step" in line for line in lines), run, 60)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    stderr = run.stderr.read()
    run_dir = run_folder(tmp_path)
    stopped = max(logged(run_dir, "loss"))
    assert run.returncode == 130, stderr[-3000:]
    assert f"SIGTERM: stopped after step {stopped} with a checkpoint" in stderr, stderr[-3000:]
    # The checkpoint the first SIGTERM asked for is whole: sealed, of the last step, nothing skipped.
    checkpoint, skipped = latest_checkpoint(run_dir)
    assert checkpoint == run_dir / "checkpoints" / f"checkpoint-{stopped}" and skipped == []


def logged_or_empty(output: Path) -> list[str]:
    """Loss lines the running trainer has finished writing so far."""
    logs = list(output.glob("smoke/*/log.jsonl"))
    return [line for line in logs[0].read_text().split("\n")[:-1] if '"loss"' in line] if logs else []


def test_resume_skips_checkpoints_that_fail_their_integrity_check(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(bytes([step]) * 100)
        (checkpoint / "trainer_state.json").write_text("{}")
        if step < 6:  # the newest was never sealed: the run died while writing it
            seal_checkpoint(checkpoint)
    assert checkpoint_problem(folder / "checkpoint-6") == "not sealed (the run stopped while writing it)"
    assert latest_checkpoint(tmp_path) == (
        folder / "checkpoint-4",
        ["skipped checkpoint-6: not sealed (the run stopped while writing it)"],
    )
    (folder / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # same size
    (folder / "checkpoint-2" / "trainer_state.json").unlink()
    checkpoint, skipped = latest_checkpoint(tmp_path)
    assert checkpoint is None and skipped[1:] == [
        "skipped checkpoint-4: adapter_model.safetensors differs from when it was saved",
        "skipped checkpoint-2: trainer_state.json is missing",
    ]


def test_secret_values_are_redacted_from_what_runs_write(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not a secret: left alone
    text = f"argv: --token {SECRET} key={'k' * 40} offline=1"
    assert redact(text) == "argv: --token <redacted> key=<redacted> offline=1"


def test_the_watch_stops_on_nan_or_exploding_gradients_and_flags_spikes():
    watch = Watch(patience=2)
    for step in range(1, 8):
        assert watch.observe(step, 2.0 + 0.01 * step, 1.0) is None
    assert watch.observe(8, 9.0, 1.0) is None and watch.spikes == [
        {"step": 8, "loss": 9.0, "running_median": pytest.approx(2.04)}
    ]
    assert watch.observe(9, float("nan"), 1.0) is None and watch.is_bad()  # one bad step: patience
    assert watch.observe(10, 2.0, 1.0) is None and not watch.is_bad()  # a good step resets it
    assert watch.observe(11, 2.0, 150.0) is None  # 150x the median gradient norm
    assert watch.observe(12, float("inf"), 1.0) == (
        "the gradient norm 150 is above 100 at step 11, and 1 more bad steps in a row; "
        "the last good step was 10"
    )
    assert (
        Watch(patience=1, grad_norm_limit=5.0)
        .observe(1, 1.0, 6.0)
        .startswith("the gradient norm 6 is above 5")
    )


def run_with_fault(fault: str, output: Path, *overrides) -> subprocess.CompletedProcess:
    return runner(
        "recipes/smoke.yaml",
        f"output.dir={output}",
        *overrides,
        env=ENV,
        env_extra={"FINETUNE_INJECT_FAULT": fault},
    )


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = run_with_fault("nan@6", tmp_path, "train.max_steps=20", "train.save_steps=2")
    assert out.returncode == 4, out.stderr[-3000:]
    run_dir = run_folder(tmp_path)
    assert (
        "diverged: the loss is nan at step 6, and 2 more bad steps in a row; the last good step was 5"
        in " ".join(out.stderr.split())
    )
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'checkpoint-4'}" in " ".join(
        out.stderr.split()
    )
    assert latest_checkpoint(run_dir)[0].name == "checkpoint-4" and not (run_dir / "adapter").exists()
    assert max(logged(run_dir, "loss")) == 8  # stopped at the third bad step


def test_out_of_memory_is_caught_saved_and_explained(tmp_path):
    out = run_with_fault("oom@4", tmp_path, "train.max_steps=10")
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    run_dir = run_folder(tmp_path)
    stderr = " ".join(out.stderr.split())
    assert (
        "error: out of memory at step 4 (" in stderr
        and "tokens in the micro-batch); saved checkpoint-3" in stderr
    )
    assert "peak memory measured: not measured on the CPU" in stderr and "predicted: " in stderr
    assert latest_checkpoint(run_dir)[0].name == "checkpoint-3"
    assert f"the last sound checkpoint is {run_dir / 'checkpoints' / 'checkpoint-3'}" in stderr


def test_cublas_failing_to_allocate_is_out_of_memory_too(tmp_path):
    """cuBLAS reports its failed allocation as a RuntimeError, not torch's OutOfMemoryError."""
    out = run_with_fault("cublas@3", tmp_path, "train.max_steps=10")
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: out of memory at step 3 (" in " ".join(out.stderr.split())
    assert latest_checkpoint(run_folder(tmp_path))[0].name == "checkpoint-2"


def test_out_of_memory_in_the_optimizer_step_saves_nothing_half_updated(tmp_path):
    """The optimizer may have updated some weights before it ran out: that state is never saved as
    a step; the last sound checkpoint stays the latest."""
    out = run_with_fault("oom-optimizer@5", tmp_path, "train.max_steps=10", "train.save_steps=2")
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    run_dir = run_folder(tmp_path)
    stderr = " ".join(out.stderr.split())
    assert "error: out of memory at step 5 (" in stderr
    assert "not saved: it ran out outside the forward and backward pass" in stderr
    assert f"the last sound checkpoint is {run_dir / 'checkpoints' / 'checkpoint-4'}" in stderr
    assert latest_checkpoint(run_dir)[0].name == "checkpoint-4"
    assert not (run_dir / "checkpoints" / "checkpoint-5").exists()


def test_out_of_memory_in_the_probe_is_the_same_report(tmp_path):
    """The probe runs the worst micro-batch first, the likeliest place to run out: exit 3, the
    report with what was predicted, and nothing trained."""
    out = run_with_fault("oom@probe", tmp_path, "train.max_steps=10", "--probe")
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    stderr = " ".join(out.stderr.split())
    assert "error: out of memory in the probe, on the worst-case micro-batch (" in stderr
    assert "not saved: nothing was trained yet" in stderr and "predicted: " in stderr
    run_dir = run_folder(tmp_path)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "log.jsonl").exists()


def test_the_report_lists_spikes_and_data_warnings_beside_the_figures(tmp_path):
    history = [
        {"step": k, "loss": loss, "num_input_tokens_seen": 100 * k}
        for k, loss in enumerate([3.0, 2.5, 9.0, 2.0], 1)
    ]
    history.append({"step": 4, "eval_loss": 2.2})
    (tmp_path / "plan.json").write_text(
        json.dumps({"data": {"report": ["2 rows truncated to max_seq_length 64"]}})
    )
    spikes = [{"step": 3, "loss": 9.0, "running_median": 2.75}]
    path, lines = write_report(tmp_path, history, 8.0, spikes)
    report = path.read_text()
    assert lines[:3] == [
        "steps: 4 in 8.0 s, 50 trained tokens/s",
        "train loss: first 3.0000, final 2.0000, best 2.0000 (step 4)",
        "eval loss: final 2.2000, best 2.2000 (step 4)",
    ]
    assert "- loss spike at step 3: 9.0000 (3.3x the running median)" in report
    assert "- 2 rows truncated to max_seq_length 64" in report
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_out_of_memory_in_an_evaluation_is_said_so_and_names_the_eval_batch(tmp_path):
    out = run_with_fault(
        "oom-eval@4", tmp_path, "train.max_steps=8", "data.eval_fraction=0.25", "train.eval_steps=2",
        "train.save_steps=2",
    )  # fmt: skip
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    stderr = " ".join(out.stderr.split())
    assert "error: out of memory in the evaluation after step 4 (" in stderr
    assert "tokens in the eval batch); not saved: an evaluation changes no weight" in stderr
    assert (
        "predicted for an evaluation: " in stderr
        and "lower train.per_device_eval_batch_size (now 2)" in stderr
    )
    run_dir = run_folder(tmp_path)
    assert latest_checkpoint(run_dir)[0].name == "checkpoint-2"  # step 4's was never written
