"""What a user sees when a run cannot start: one sentence, a non-zero exit, no traceback."""

import json
import os
from pathlib import Path

import pytest
from cli_helpers import finished_run_shape, run_cli, runner

from finetune.base.errors import UserError
from finetune.models.shapes import count_parameters
from finetune.plan import devices, preflight
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_flagship_without_gpu_fails_at_once_with_one_sentence():
    out = run_cli("recipes/code-gen.yaml")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("error: No GPU found: recipes/code-gen.yaml trains unsloth/Meta-Llama-3.1-8B")
    assert "python runner.py recipes/smoke.yaml" in message
    assert "heavy imports: []" in out.stdout  # refused before torch was even imported


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "recipes/smoke.yaml", "recipes/code-gen.yaml"],
        ["list"],
        ["show", "recipes/code-gen.yaml"],
    ],
    ids=["validate", "list", "show"],
)
def test_light_commands_import_nothing_heavy(args):
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    assert "heavy imports: []" in out.stdout


def test_bad_recipe_value_names_the_place():
    out = run_cli("recipes/smoke.yaml", "train.learning_rate=-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "override 'train.learning_rate=-1': train.learning_rate: Input should be greater than 0" in out.stderr
    )


def test_an_unusable_output_dir_is_refused_before_anything_heavy(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    out = run_cli("recipes/smoke.yaml", f"output.dir={taken}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: output.dir '{taken}' cannot be written: {taken} is a file, not a folder" in out.stderr
    assert "heavy imports: []" in out.stdout
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize("verb", ["generate", "export", "eval"])
def test_generate_export_and_eval_refuse_what_is_not_a_finished_run_at_once(tmp_path, verb):
    args = {"generate": ["--prompt", "hi"], "export": [], "eval": ["--allow-code-execution"]}[verb]
    out = run_cli(verb, str(tmp_path), *args)
    assert (
        out.returncode == 2
        and out.stderr.strip() == f"error: '{tmp_path}' is not a run folder (no manifest.json)"
    )
    (tmp_path / "manifest.json").write_text('{"packages": ')
    out = run_cli(verb, str(tmp_path), *args)
    assert out.returncode == 2 and "manifest.json: damaged (not valid JSON" in out.stderr
    (tmp_path / "manifest.json").write_text("{}")
    out = run_cli(verb, str(tmp_path), *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: {tmp_path}: no adapter yet (the run has not finished" in out.stderr
    assert "heavy imports: []" in out.stdout


@pytest.mark.parametrize(
    "args, what",
    [
        (["plan", "recipes/smoke.yaml", "--png", "{blocked}/lr.png"], "--png"),
        (["data", "recipes/smoke.yaml", "--png", "{blocked}/lengths.png"], "--png"),
        (["schema", "--output", "{blocked}/schema.json"], "--output"),
        (["copy", "smoke", "{blocked}/mine.yaml"], "copy destination"),
        (["smoke", "--json", "{blocked}/result.json", "recipes/smoke.yaml"], "--json"),
        (["smoke", "--output", "{blocked}/runs", "recipes/smoke.yaml"], "--output"),
        (["smoke", "--update-bands", "--bands", "{blocked}/bands.json", "recipes/smoke.yaml"], "--bands"),
    ],
    ids=["plan-png", "data-png", "schema", "copy", "smoke-json", "smoke-output", "smoke-bands"],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, args, what):
    blocked = tmp_path / "a-file"  # a file where a folder would have to be
    blocked.write_text("mine")
    out = run_cli(*(arg.format(blocked=blocked) for arg in args))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: {what} '{blocked}/" in out.stderr and f"'{blocked}' is a file, not a folder" in out.stderr
    assert "heavy imports: []" in out.stdout and blocked.read_text() == "mine"


def test_a_png_path_that_is_a_folder_and_missing_bands_are_refused(tmp_path):
    out = run_cli("plan", "recipes/smoke.yaml", "--png", str(tmp_path))
    assert out.returncode == 2 and f"error: --png '{tmp_path}' is a folder; name a file" in out.stderr
    out = run_cli("smoke", "--bands", str(tmp_path / "none.json"))
    assert (
        out.returncode == 2 and "--update-bands writes it" in out.stderr and "heavy imports: []" in out.stdout
    )


def test_export_refuses_a_used_or_unwritable_folder_before_anything_heavy(tmp_path):
    run_dir = finished_run_shape(tmp_path / "run")
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.safetensors").write_text("an earlier export")
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    for out, message in [
        (used, f"'{used}' already exists and is not empty; nothing was overwritten"),
        (taken, f"'{taken}' already exists and is not empty; nothing was overwritten"),
        (taken / "merged", f"--out '{taken / 'merged'}': '{taken}' is a file, not a folder"),
    ]:
        result = run_cli("export", str(run_dir), "--out", str(out))
        assert result.returncode == 2 and f"error: {message}" in result.stderr
        assert "heavy imports: []" in result.stdout
    assert (used / "model.safetensors").read_text() == "an earlier export" and taken.read_text() == "mine"


def test_missing_recipe_file():
    out = run_cli("recipes/nope.yaml")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: recipe file 'recipes/nope.yaml' does not exist"


def test_runner_script_is_the_same_cli():
    out = runner("recipes/nope.yaml")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_hub_model_not_in_cache_while_offline_is_refused(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", lambda: [devices.Gpu("NVIDIA H100", 80.0, 79.0)])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml")
    with pytest.raises(UserError, match=r"^Model not reachable: .* HF_HUB_OFFLINE is set"):
        preflight.check_can_start(recipe, "recipes/code-gen.yaml")


def test_tiny_model_may_train_on_cpu(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", lambda: [])
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    assert preflight.check_can_start(recipe, "recipes/smoke.yaml") == []


def test_missing_local_model_folder(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", [f"model.name={tmp_path}/absent"])
    with pytest.raises(UserError, match="looks like a local folder but does not exist"):
        preflight.check_can_start(recipe, "r.yaml")


def test_parameter_count_of_llama31_8b():
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    assert count_parameters(config) == 8_030_261_248  # Meta's published count


def test_a_gpu_host_without_what_triton_needs_is_refused_before_training(monkeypatch, tmp_path):
    """Triton compiles Unsloth's kernels at the first step: without a C compiler that is a crash
    minutes in; here it is one sentence before anything starts."""
    from finetune.plan import device_speed

    monkeypatch.setattr(device_speed, "cuda_status", lambda: {"torch": "2.14.1", "cuda_build": "13.0"})
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UserError, match="Triton compiles Unsloth's GPU kernels .* needs a C compiler"):
        preflight.check_gpu_usable(devices.Gpu("NVIDIA H100", 80.0, 79.0, "580.82"), "r.yaml")
    monkeypatch.setenv("CC", "/usr/bin/cc")  # the user's compiler
    preflight.check_gpu_usable(devices.Gpu("NVIDIA H100", 80.0, 79.0, "580.82"), "r.yaml")


def test_the_gpus_planned_for_are_the_ones_cuda_visible_devices_leaves(tmp_path, monkeypatch):
    """nvidia-smi lists every GPU of the machine; torch sees only CUDA_VISIBLE_DEVICES', in its order."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'echo "0, GPU-1111aaaa-0000, NVIDIA A100-SXM4-80GB, 81920, 80000, 580.82.07"\n'
        'echo "1, GPU-2222bbbb-0000, NVIDIA H100 80GB HBM3, 81559, 81000, 580.82.07"\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def names(visible):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        return [gpu.name for gpu in devices.detect_gpus()]

    a100, h100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
    assert names(None) == [a100, h100]
    assert names("1") == [h100] and names("1,0") == [h100, a100]
    assert names("GPU-2222bbbb") == [h100]  # a UUID prefix, as CUDA takes it
    assert names("") == [] and names("7") == [] and names("0,7,1") == [a100]
    assert devices.detect_gpus()[0].driver == "580.82.07"


def test_plan_prints_the_trainable_parameters_and_their_share_and_json_carries_both():
    out = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "RTX 4090")
    assert "parameters: 83,886,080 trainable (LoRA), 1.04% of 8,030,261,248\n" in out.stdout
    out = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "RTX 4090", "lora.r=16", "--json")
    document = json.loads(out.stdout.splitlines()[0])
    assert document["parameters"] == {"trainable": 41_943_040, "total": 8_030_261_248, "dora": False}
    # DoRA adds a magnitude per output row of each targeted projection: 43,008 per layer of 32.
    out = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "RTX 4090", "lora.use_dora=true")
    assert "parameters: 85,262,336 trainable (DoRA), 1.06% of 8,030,261,248\n" in out.stdout


def test_an_option_of_another_verb_is_named_not_prefix_matched():
    """`train --gpu h100`, copied from plan, was read as train's --gpus ("invalid int value")."""
    out = run_cli("train", "recipes/smoke.yaml", "--gpu", "h100")
    assert out.returncode == 2 and "invalid int value" not in out.stderr
    assert "unrecognized arguments: --gpu h100; --gpu is an option of plan, not of train" in out.stderr


def test_validate_takes_overrides_like_every_verb_that_reads_a_recipe():
    ok = run_cli("validate", "recipes/smoke.yaml", "train.max_steps=5")
    assert ok.returncode == 0 and "ok recipes/smoke.yaml" in ok.stdout
    bad = run_cli("validate", "recipes/smoke.yaml", "train.max_steps=true")
    assert bad.returncode == 2 and "error: override 'train.max_steps=true'" in bad.stderr
    assert "recipe file 'train.max_steps=true'" not in bad.stderr  # not taken for a second recipe


def test_a_python_without_our_packages_is_told_how_to_get_them():
    """The system python3 instead of .venv's: one sentence naming the missing package and the fix."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-S", "runner.py", "list"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "is not installed for" in out.stderr
        and "run `make setup`, then `.venv/bin/python runner.py" in out.stderr
    )


@pytest.mark.parametrize("verb", ["plan", "train"])
def test_a_model_name_that_is_no_model_is_named_with_the_nearest(verb):
    out = run_cli(verb, "recipes/smoke.yaml", "model.name=tiny-llama3")
    assert out.returncode == 2 and "No GPU found" not in out.stderr and "not predicted" not in out.stdout
    assert (
        "model.name 'tiny-llama3' is no model" in out.stderr and "did you mean 'tiny-llama-3'?" in out.stderr
    )


def test_rows_with_other_field_names_are_told_of_data_columns_and_the_hint_works(tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n')
    out = run_cli("plan", "recipes/smoke.yaml", f"data.train={rows}")
    assert out.returncode == 2 and f"error: {rows}:1: expected 'messages'" in out.stderr
    hint = "data.columns={prompt: question, completion: answer}"
    assert f"map them with data.columns, e.g. {hint}" in out.stderr
    assert run_cli("plan", "recipes/smoke.yaml", f"data.train={rows}", hint).returncode == 0
