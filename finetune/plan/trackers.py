"""Experiment trackers: the recipe's output.report_to, handed to transformers under its own names.

TensorBoard's events go into the run folder through a writer of ours (train.build_trainer: transformers
5 takes TensorBoard's folder only from the environment). The others are transformers' own callbacks
(WandbCallback, MLflowCallback, TrackioCallback), which read their settings from environment variables;
tracker_environment says which, and the training process sets each one only where the user has not:

- wandb: project = the recipe's name; its files in the run folder (RUN/wandb); run id = the run
  folder's name with WANDB_RESUME=allow, so `resume` continues the same W&B run. WANDB_MODE=offline
  keeps everything local (`wandb sync RUN/wandb/offline-run-*` uploads it later).
- mlflow: experiment = the recipe's name; a local SQLite store beside the runs (OUTPUT_DIR/mlflow.db)
  unless MLFLOW_TRACKING_URI names another; the MLflow run's id is kept in RUN/trackers.json, and a
  resume continues that run (MLFLOW_RUN_ID).
- trackio: project = the recipe's name (SFTConfig's `project`), logged locally in trackio's folder.

Keys (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) stay in the environment, where each tracker reads
them itself; nothing here copies one anywhere. No heavy import: `plan` checks the trackers in
milliseconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import netrc
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

TRACKERS_FILE = "trackers.json"  # in the run folder: the ids a resume continues
# What `pip install` brings each tracker's module (mlflow-skinny is MLflow without its server and UI;
# its SQLite store needs sqlalchemy and alembic).
_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow-skinny sqlalchemy alembic",
    "trackio": "trackio",
}


def transformers_report_to(report_to: list[str], training: bool = True) -> list[str] | str:
    """SFTConfig's report_to: the trackers transformers runs itself (TensorBoard is ours), or "none"
    (also for the probe's few steps and anything else that is not the run itself)."""
    names = [name for name in report_to if name != "tensorboard"] if training else []
    return names or "none"


def check_trackers(report_to: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """What stops the recipe's trackers on this machine, found before anything is loaded: a
    tracker whose package is missing, or W&B online without a key, would fail only once the model
    has loaded and training starts (wandb.init raises UsageError: no API key)."""
    environ = os.environ if environ is None else environ
    missing = [name for name in report_to if not _installed(name, environ)]
    problems = [
        f"output.report_to: {name} is not installed here; `pip install {_PACKAGES[name]}`, "
        "or remove it from report_to"
        for name in missing
    ]
    wandb_online = "wandb" in report_to and "wandb" not in missing and not _wandb_offline(environ)
    if wandb_online and not _wandb_credentials(environ):
        problems.append(
            "output.report_to: wandb has no W&B key here (WANDB_API_KEY, or ~/.netrc from `wandb login`) "
            "and would fail when training starts; log in, or set WANDB_MODE=offline to log locally "
            "and `wandb sync` later"
        )
    return problems


def tracker_environment(
    report_to: list[str],
    project: str,
    run_dir: Path,
    output_dir: Path,
    recorded: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment variables that set the trackers up for this run (see the module's
    docstring); `environment` applies each one the user has not set. ``recorded``: the ids the run
    folder kept (recorded_ids), so a resumed run continues its MLflow run in the same store."""
    settings: dict[str, str] = {}
    recorded = recorded or {}
    if "wandb" in report_to:
        settings.update(
            WANDB_PROJECT=project,
            WANDB_DIR=str(run_dir.resolve()),
            WANDB_RUN_ID=run_dir.name,
            WANDB_RESUME="allow",
        )
    if "mlflow" in report_to:
        store = recorded.get("mlflow_tracking_uri") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
        settings.update(MLFLOW_EXPERIMENT_NAME=project, MLFLOW_TRACKING_URI=store)
        if recorded.get("mlflow_run_id"):
            settings["MLFLOW_RUN_ID"] = recorded["mlflow_run_id"]
    return settings


def run_environment(report_to: list[str], run_dir: Path, output_dir: Path) -> dict[str, str]:
    """tracker_environment for the run in ``run_dir`` (OUTPUT_DIR/<recipe name>/<run>), with the
    ids it recorded when it started, if it did."""
    return tracker_environment(report_to, run_dir.parent.name, run_dir, output_dir, recorded_ids(run_dir))


@contextlib.contextmanager
def environment(settings: Mapping[str, str], environ: MutableMapping[str, str] | None = None):
    """Each variable of ``settings`` that the user has not set, for the time of the block (a test
    or the smoke trains several runs in one process; one run's ids must not reach the next)."""
    environ = os.environ if environ is None else environ
    applied = [name for name in settings if name not in environ]
    environ.update({name: settings[name] for name in applied})
    try:
        yield
    finally:
        for name in applied:
            environ.pop(name, None)  # MLflow's start_run removes MLFLOW_RUN_ID itself


def recorded_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids the run folder recorded (empty for a run that logged to none)."""
    path = run_dir / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _installed(name: str, environ: Mapping[str, str]) -> bool:
    """The tracker's module, and for MLflow's SQLite store (ours, unless the user names another
    store) SQLAlchemy, which mlflow-skinny leaves out."""
    uri = environ.get("MLFLOW_TRACKING_URI", "sqlite:")
    needs = [name, "sqlalchemy"] if name == "mlflow" and uri.startswith("sqlite:") else [name]
    return all(importlib.util.find_spec(module) is not None for module in needs)


def _wandb_offline(environ: Mapping[str, str]) -> bool:
    return environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or environ.get(
        "WANDB_DISABLED", ""
    ).lower() in ("1", "true", "yes")


def _wandb_credentials(environ: Mapping[str, str]) -> bool:
    """A key where wandb looks first: the environment, then the netrc file `wandb login` writes."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = Path(environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False
