"""The recipe schema: every shipped recipe is valid, and every mistake is named with its place."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import runner

from finetune.base.errors import UserError
from finetune.cli.arguments import field_reference
from finetune.plan.schedule import scheduler_kwargs
from finetune.recipe.schema import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))

MINIMAL = """\
schema: 1
version: 1.0.0
description: test
model:
  name: tiny-llama-3
data:
  train: data_samples/code_chat.jsonl
train:
  learning_rate: 1.0e-4
"""


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_are_valid(path, tmp_path):
    recipe = load_recipe(path)
    # Its own description and version, as written in it, even where it extends a parent recipe
    # (code-gen-16k, 1.0.0, extends code-gen, 1.1.0): what it is for, in `runner.py list` and runs.
    written = yaml.safe_load(path.read_text())
    assert (recipe.description, recipe.version) == (written["description"], written["version"])
    # The resolved recipe that every run saves reads back into the same recipe, from its own folder.
    saved = tmp_path / "run" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(dump_recipe(recipe))
    assert load_recipe(saved) == recipe


def test_flagship_recipe_is_llama31_8b_qlora_on_all_projections():
    recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml")
    assert "Llama-3.1-8B" in recipe.model.name and recipe.model.load_in_4bit
    assert set(recipe.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert recipe.train.lr_scheduler_type == "cosine"
    assert (recipe.train.warmup_steps or recipe.train.warmup_ratio) > 0


def test_every_setting_has_a_one_line_description_shown_in_help():
    rows = field_reference()
    assert len(rows) > 30
    assert all(description and "\n" not in description for _, _, description in rows)
    shown = runner("train", "--help")
    assert shown.returncode == 0, shown.stderr
    help_text = shown.stdout
    assert all(key in help_text and description in help_text for key, _, description in rows)


def test_min_lr_reaches_the_trainer_scheduler_kwargs(tmp_path):
    # schedule.scheduler_kwargs is what train.build_sft_config passes as SFTConfig.lr_scheduler_kwargs
    # (tests/test_train.py checks that hand-over with the heavy imports); this is the mapping itself.
    path = write(tmp_path, MINIMAL)  # learning_rate 1e-4

    def kwargs(*overrides):
        return scheduler_kwargs(load_recipe(path, list(overrides)).train)

    # transformers' cosine_with_min_lr takes exactly one of min_lr_rate or min_lr, as the recipe gave it.
    assert kwargs("train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_rate=0.1") == {
        "min_lr_rate": 0.1
    }
    assert kwargs("train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr=2.0e-5") == {"min_lr": 2e-5}
    # polynomial decays to lr_end: the floor in absolute terms (0.1 x 1e-4), with power defaulting to 1.
    polynomial = kwargs("train.lr_scheduler_type=polynomial", "train.min_lr_rate=0.1")
    assert polynomial == {"lr_end": pytest.approx(1e-5, rel=1e-12), "power": 1.0}
    assert kwargs("train.lr_scheduler_type=polynomial", "train.min_lr=3.0e-6", "train.power=2.0") == {
        "lr_end": 3e-6,
        "power": 2.0,
    }
    # Without a floor, polynomial ends at transformers' own default lr_end (1e-7).
    assert kwargs("train.lr_scheduler_type=polynomial") == {"lr_end": 1e-7, "power": 1.0}
    # Schedules that take no extra arguments get none (transformers would reject unknown ones).
    assert kwargs("train.lr_scheduler_type=cosine") == {} and kwargs("train.lr_scheduler_type=linear") == {}


def test_misspelled_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, MINIMAL.replace("learning_rate:", "lerning_rate:"))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}:9: unknown key 'train.lerning_rate'; did you mean 'learning_rate'?"


def test_every_problem_reported_together_with_lines(tmp_path):
    text = MINIMAL.replace("learning_rate: 1.0e-4", "learning_rate: -1\n  optim: sgdd")
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, text))
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        f"{tmp_path / 'r.yaml'}:9: train.learning_rate: Input should be greater than 0"
    )
    assert lines[1].startswith(f"{tmp_path / 'r.yaml'}:10: train.optim:") and "adamw_8bit" in lines[1]


def test_missing_required_field(tmp_path):
    with pytest.raises(UserError, match=r"'model' is required"):
        load_recipe(write(tmp_path, MINIMAL.replace("model:\n  name: tiny-llama-3\n", "")))


def test_warmup_steps_and_ratio_are_exclusive(tmp_path):
    text = MINIMAL + "  warmup_steps: 10\n  warmup_ratio: 0.1\n"
    with pytest.raises(UserError, match="set warmup_steps or warmup_ratio, not both"):
        load_recipe(write(tmp_path, text))


def test_newer_schema_is_refused(tmp_path):
    with pytest.raises(UserError, match="newer than this program understands"):
        load_recipe(write(tmp_path, MINIMAL.replace("schema: 1", "schema: 2")))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"r\.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, MINIMAL + "  bad: [unclosed\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.max_steps=5", "lora.r=4"])
    assert recipe.train.max_steps == 5 and recipe.lora.r == 4
    with pytest.raises(
        UserError, match=r"override 'train\.max_step=5': unknown key .*did you mean 'max_steps'"
    ):
        load_recipe(path, ["train.max_step=5"])
    with pytest.raises(UserError, match="must look like section.key=value"):
        load_recipe(path, ["train.max_steps"])


def test_validation_path_imports_no_heavy_library():
    code = (
        "import sys; import finetune.cli.commands, finetune.recipe.schema, finetune.data.rows,"
        " finetune.plan.preflight, finetune.plan.budget;"
        "print(sorted(m for m in ('torch', 'unsloth', 'trl', 'transformers', 'peft', 'datasets')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
