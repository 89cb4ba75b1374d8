"""output.report_to: the schema, what transformers is handed, the environment each tracker reads, and
the checks made before launch (no torch, no tracker imported)."""

import os
import sys
from pathlib import Path

import pytest

from finetune.base.errors import UserError
from finetune.plan import trackers
from finetune.plan.job import plan_job
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"


@pytest.mark.parametrize(
    ("written", "read"),
    [
        (None, ["tensorboard"]),  # the default
        ("wandb", ["wandb"]),
        ("none", []),
        ("[]", []),
        ("[tensorboard,mlflow,mlflow]", ["tensorboard", "mlflow"]),
    ],
)
def test_report_to_takes_transformers_spellings(written, read):
    overrides = [] if written is None else [f"output.report_to={written}"]
    assert load_recipe(SMOKE, overrides).output.report_to == read


def test_an_unknown_tracker_is_an_error_naming_the_known_ones():
    with pytest.raises(UserError, match="output.report_to.0: Input should be 'tensorboard', 'wandb'"):
        load_recipe(SMOKE, ["output.report_to=[wandbb]"])


def test_transformers_runs_the_trackers_but_tensorboard_and_never_for_the_probe():
    assert trackers.transformers_report_to(["tensorboard", "wandb", "mlflow"]) == ["wandb", "mlflow"]
    assert trackers.transformers_report_to(["tensorboard"]) == "none"
    assert trackers.transformers_report_to(["wandb"], training=False) == "none"


def test_each_tracker_is_set_up_for_the_run_and_a_resume_continues_its_mlflow_run(tmp_path):
    run_dir = tmp_path / "runs" / "code-gen" / "20261205-120000-abcdef"
    settings = trackers.tracker_environment(
        ["tensorboard", "wandb", "mlflow"], "code-gen", run_dir, tmp_path / "runs"
    )
    assert settings == {
        "WANDB_PROJECT": "code-gen",
        "WANDB_DIR": str(run_dir.resolve()),
        "WANDB_RUN_ID": "20261205-120000-abcdef",
        "WANDB_RESUME": "allow",
        "MLFLOW_EXPERIMENT_NAME": "code-gen",
        "MLFLOW_TRACKING_URI": f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}",
    }
    recorded = {"mlflow_run_id": "abc123", "mlflow_tracking_uri": "sqlite:////elsewhere/mlflow.db"}
    resumed = trackers.tracker_environment(["mlflow"], "code-gen", run_dir, tmp_path / "moved", recorded)
    assert resumed["MLFLOW_RUN_ID"] == "abc123"
    assert resumed["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"  # the store it started in
    assert trackers.tracker_environment(["tensorboard"], "code-gen", run_dir, tmp_path) == {}


def test_the_users_own_settings_win_and_ours_are_gone_after_the_run():
    environ = {"WANDB_PROJECT": "mine"}
    with trackers.environment({"WANDB_PROJECT": "code-gen", "WANDB_RUN_ID": "r1"}, environ):
        assert environ == {"WANDB_PROJECT": "mine", "WANDB_RUN_ID": "r1"}
    assert environ == {"WANDB_PROJECT": "mine"}


def test_the_run_ids_are_read_back_from_the_run_folder(tmp_path):
    assert trackers.recorded_ids(tmp_path) == {}
    (tmp_path / trackers.TRACKERS_FILE).write_text('{"mlflow_run_id": "abc"}')
    assert trackers.recorded_ids(tmp_path) == {"mlflow_run_id": "abc"}


def test_a_tracker_that_is_not_installed_stops_the_plan_in_one_sentence(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    recipe = load_recipe(SMOKE, ["output.report_to=[tensorboard,wandb]"])
    with pytest.raises(UserError) as error:
        plan_job(recipe, str(SMOKE))
    assert str(error.value) == (
        f"{SMOKE}: output.report_to: wandb is not installed here; `pip install wandb`, "
        "or remove it from report_to"
    )


@pytest.mark.parametrize(
    ("environ", "refused"),
    [
        ({}, True),
        ({"WANDB_API_KEY": "k" * 40}, False),
        ({"WANDB_MODE": "offline"}, False),
        ({"WANDB_MODE": "disabled"}, False),
    ],
)
def test_wandb_online_without_a_key_is_refused_before_launch(tmp_path, environ, refused):
    environ = {"NETRC": str(tmp_path / "no-netrc"), **environ}
    problems = trackers.check_trackers(["wandb"], environ)
    assert len(problems) == refused
    assert not refused or "set WANDB_MODE=offline" in problems[0]


def test_a_key_from_wandb_login_in_netrc_counts(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert trackers.check_trackers(["wandb"], {"NETRC": str(netrc)}) == []


def test_checking_the_trackers_imports_none_of_them():
    code = (
        "import sys; from finetune.plan.trackers import check_trackers;"
        "check_trackers(['wandb', 'mlflow', 'tensorboard'], {'WANDB_MODE': 'offline'});"
        "print([m for m in ('wandb', 'mlflow', 'tensorboard', 'torch') if m in sys.modules])"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_mlflows_sqlite_store_needs_sqlalchemy_and_a_server_does_not(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sqlalchemy" else real(name, *a),
    )
    (problem,) = trackers.check_trackers(["mlflow"], {})
    assert "`pip install mlflow-skinny sqlalchemy alembic`" in problem
    assert trackers.check_trackers(["mlflow"], {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}) == []
