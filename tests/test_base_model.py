"""The base model's identity: recorded in a run's manifest, and a resume refuses a changed one."""

import json
from pathlib import Path

import pytest

from finetune.base.errors import UserError
from finetune.data.store import run_fingerprints
from finetune.models.base import base_model
from finetune.recipe.schema import load_recipe
from finetune.runs import resume

ROOT = Path(__file__).resolve().parent.parent


def test_a_local_folder_is_identified_by_its_config_and_weight_files(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", [f"model.name={folder}"])
    first = base_model(recipe)
    assert first["path"] == str(folder.resolve()) and first["revision"].startswith("sha256:")
    assert base_model(recipe) == first  # nothing changed, same identity
    (folder / "model.safetensors").write_bytes(b"x" * 11)  # other weights
    resized = base_model(recipe)["revision"]
    (folder / "config.json").write_text('{"hidden_size": 16}')  # another architecture
    reconfigured = base_model(recipe)["revision"]
    assert len({first["revision"], resized, reconfigured}) == 3


def test_a_hub_model_is_identified_by_its_cached_snapshot_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["model.name=org/model"])
    assert base_model(recipe) == {"name": "org/model", "path": None, "revision": None}
    commit = "a" * 40
    (tmp_path / "models--org--model" / "refs").mkdir(parents=True)
    (tmp_path / "models--org--model" / "refs" / "main").write_text(commit)
    (tmp_path / "models--org--model" / "snapshots" / commit).mkdir(parents=True)
    found = base_model(recipe)
    assert found["revision"] == commit and found["path"].endswith(commit)


def test_resume_refuses_a_changed_base_model_before_anything_heavy(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    recorded = run_fingerprints(recipe)
    assert recorded["base model"].startswith("tiny-llama-3 at ")
    recorded["base model"] = "tiny-llama-3 at 0000000000"  # as if the run had trained another build
    (tmp_path / "manifest.json").write_text(json.dumps({"fingerprints": recorded}))
    with pytest.raises(UserError, match="base model: was tiny-llama-3 at 0000000000, now tiny-llama-3 at "):
        resume.resume_point(recipe, tmp_path, force=False)
    # --force resumes anyway, warning of the change (here from the first step: no checkpoint).
    checkpoint, lines = resume.resume_point(recipe, tmp_path, force=True)
    assert checkpoint is None and lines[0].startswith("warning: --force: resuming although base model: was")
    assert lines[-1] == "no sound checkpoint yet: training again from the first step"


def test_resume_trains_again_from_the_first_step_only_a_run_that_never_finished(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # unsealed: died while writing it
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 12.0}\n')
    checkpoint, lines = resume.resume_point(recipe, tmp_path, force=False)
    assert (
        checkpoint is None
        and not (tmp_path / "checkpoints").exists()
        and not (tmp_path / "log.jsonl").exists()
    )
    assert (
        lines[-1]
        == "no sound checkpoint yet: training again from the first step (removed checkpoints, log.jsonl)"
    )
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="has finished .*: nothing to resume"):
        resume.resume_point(recipe, tmp_path, force=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_restart_moves_damaged_sealed_checkpoints_aside_and_never_deletes_them(tmp_path):
    from finetune.runs.run_folder import seal_checkpoint

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    sealed = tmp_path / "checkpoints" / "checkpoint-4"
    sealed.mkdir(parents=True)
    (sealed / "adapter_model.safetensors").write_bytes(b"trained" * 100)
    seal_checkpoint(sealed)
    (sealed / "adapter_model.safetensors").write_bytes(b"trainee" * 100)  # damaged since: same size
    (tmp_path / "checkpoints" / "checkpoint-6").mkdir()  # unsealed: died while writing it
    checkpoint, lines = resume.resume_point(recipe, tmp_path, force=False)
    assert checkpoint is None
    assert "skipped checkpoint-4: adapter_model.safetensors differs from when it was saved" in lines
    assert lines[-1] == (
        "no sound checkpoint yet: training again from the first step "
        "(moved checkpoint-4 (damaged since sealed) to damaged-checkpoints/; removed checkpoints)"
    )
    kept = tmp_path / "damaged-checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    assert kept.read_bytes() == b"trainee" * 100 and not (tmp_path / "checkpoints").exists()
