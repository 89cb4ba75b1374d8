"""Early stopping and the best checkpoint on the real stack (Unsloth's CPU path, TRL, transformers):
the run stops where its patience says, adapter/ holds the checkpoint with the lowest eval loss, that
checkpoint survives save_total_limit's rotation beside the last one, and a run killed after an
evaluation resumes to the same train and eval losses, the same stop and the same adapter."""

import importlib.util
import json
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_lifecycle import ENV, logged, resume, run_folder, start, wait_for

from finetune.runs.outcome import early_stop_step
from finetune.runs.run_folder import SEAL

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "benchmarks" / "docs_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)
# The smoke recipe evaluated on other rows (code_alpaca's), at a learning rate that overfits the
# tiny model within 20 steps: its eval loss falls to a low, then rises (docs/recipes-and-data.md
# quotes this run's output).
RECIPE = figures.EARLY_STOPPING


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    return sorted(logged(run_dir, "eval_loss").items())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("stopped")
    whole = start(*RECIPE, output=output)
    out, err = whole.communicate()
    assert whole.returncode == 0, err[-3000:]
    (output / "stdout.txt").write_text(out)
    return run_folder(output)


def test_the_docs_quote_this_runs_output(stopped_run):
    out = (stopped_run.parents[1] / "stdout.txt").read_text()
    quoted = figures.block(ROOT / "docs" / "recipes-and-data.md", "early-stopping")
    fresh = figures.early_stopping_lines(out)
    assert figures.same_within(quoted, fresh), (
        f"run `make docs`: the docs quote {quoted}, a run prints {fresh}"
    )


def test_early_stopping_ends_the_run_where_the_patience_says(stopped_run):
    evals = evaluations(stopped_run)
    stop = early_stop_step(evals, patience=2)
    # The premise: this run's eval loss turns up before max_steps (else nothing here is tested).
    assert stop is not None and stop < 20, evals
    assert max(logged(stopped_run, "loss")) == stop  # the last step trained is the stop
    assert evals[-1][0] == stop
    best = json.loads((stopped_run / "best.json").read_text())
    assert best["early_stopped"] and best["last_step"] == stop
    history = (stopped_run / "history.jsonl").read_text()
    assert f"finished at step {stop}: stopped early, best step {best['step']}" in history


def test_adapter_is_the_lowest_eval_loss_and_survives_rotation_beside_the_last(stopped_run):
    evals = evaluations(stopped_run)
    lowest_step, lowest = min(evals, key=lambda point: point[1])
    best = json.loads((stopped_run / "best.json").read_text())
    assert best["step"] == lowest_step and best["value"] == pytest.approx(lowest, abs=1e-6)
    last = best["last_step"]
    assert lowest_step < last - 2  # it would have been rotated out: save_total_limit is 2
    kept = sorted(p.name for p in (stopped_run / "checkpoints").glob("checkpoint-*"))
    assert kept == sorted([f"checkpoint-{lowest_step}", f"checkpoint-{last}"])
    adapter = load_file(str(stopped_run / "adapter" / "adapter_model.safetensors"))
    checkpoints = stopped_run / "checkpoints"
    at_best = load_file(str(checkpoints / f"checkpoint-{lowest_step}" / "adapter_model.safetensors"))
    at_last = load_file(str(checkpoints / f"checkpoint-{last}" / "adapter_model.safetensors"))
    assert adapter.keys() == at_best.keys()
    assert all(adapter[name].equal(at_best[name]) for name in adapter)
    assert not all(adapter[name].equal(at_last[name]) for name in adapter)
    report = (stopped_run / "report.md").read_text()
    assert f"best checkpoint: step {lowest_step} (eval_loss {lowest:.4f}), in adapter/" in report
    assert f"early stopping ended the run at step {last}: 2 evaluations in a row" in report


def test_a_run_killed_after_an_evaluation_and_moved_resumes_to_the_same_stop(stopped_run, tmp_path):
    """Killed after the evaluation that began the wait (the patience counter at 1), and its folder
    moved: a resume that lost the counter, the best metric or the best checkpoint would stop later,
    elsewhere, or with another adapter."""
    best = json.loads((stopped_run / "best.json").read_text())
    after = best["step"] + 2  # the first evaluation that did not improve
    killed = start(*RECIPE, output=tmp_path)
    wait_for(lambda: list(tmp_path.glob(f"smoke/*/checkpoints/checkpoint-{after}/{SEAL}")), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (run_folder(tmp_path) / "adapter").exists()
    # The run folder moved before its resume (transformers records the best checkpoint by its
    # absolute path, and forgets it, warning, when that path is gone).
    shutil.move(tmp_path / "smoke", tmp_path / "elsewhere" / "smoke")
    run_dir = run_folder(tmp_path / "elsewhere")
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{after}" in resumed.stdout
    assert "does not exist anymore" not in resumed.stderr
    assert logged(run_dir, "loss") == logged(stopped_run, "loss")
    assert logged(run_dir, "eval_loss") == logged(stopped_run, "eval_loss")
    assert json.loads((run_dir / "best.json").read_text()) == best
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(stopped_run / "adapter" / "adapter_model.safetensors"))
    assert all(adapter[name].equal(expected[name]) for name in expected)
    assert ENV["CUDA_VISIBLE_DEVICES"] == ""  # bit for bit holds on this CPU

    # Killed once more, after the checkpoint of the step early stopping ended at and before the
    # adapter: transformers would reset the stop and train on; the resume only loads the best.
    shutil.rmtree(run_dir / "adapter")
    for name in ("best.json", "report.md", "budget.json"):
        (run_dir / name).unlink()
    # Moved again: this resume saves no checkpoint (transformers re-finds the best at each save),
    # so only the name under which the best was kept finds it in the moved folder.
    shutil.move(tmp_path / "elsewhere" / "smoke", tmp_path / "smoke")
    run_dir = run_folder(tmp_path)
    again = resume(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from checkpoint-{best['last_step']}" in again.stdout
    assert max(logged(run_dir, "loss")) == best["last_step"]  # no step after the stop
    assert json.loads((run_dir / "best.json").read_text()) == best
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(adapter[name].equal(expected[name]) for name in expected)


def test_the_probe_runs_the_worst_eval_batch_too(tmp_path):
    from cli_helpers import runner

    trained = runner(
        "recipes/smoke.yaml", "--probe", "data.eval_fraction=0.25", "train.eval_steps=10",
        "train.max_steps=4", "output.samples=0", f"output.dir={tmp_path}", env=ENV,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    plan = json.loads((run_folder(tmp_path) / "plan.json").read_text())
    longest = max(plan["data"]["eval_token_lengths"])
    assert plan["budget"]["eval_tokens_per_batch"] == 2 * longest
    assert f"probe: an eval batch of {2 * longest} tokens (the longest eval rows)" in trained.stdout


def test_tensorboard_shows_the_eval_loss_under_its_usual_name(stopped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stopped_run / "tensorboard"))
    events.Reload()
    scalars = {(e.step, round(e.value, 4)) for e in events.Scalars("eval/loss")}
    assert scalars == {(step, round(loss, 4)) for step, loss in evaluations(stopped_run)}
    assert "train/loss" in events.Tags()["scalars"]
