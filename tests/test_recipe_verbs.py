"""list, copy, diff, show, schema: the copy-and-edit workflow around recipes."""

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

from finetune.cli.arguments import json_schema
from finetune.cli.commands import main
from finetune.recipe.documents import shipped_recipes
from finetune.recipe.lineage import file_sha256
from finetune.recipe.paths import path_from
from finetune.recipe.schema import SCHEMA_FILE, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_schema_file_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "run: python runner.py schema --output " + str(SCHEMA_FILE.relative_to(ROOT))
    )


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_shipped_recipe_opens_with_schema_reference_and_purpose(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=./recipe.schema.json"
    assert any(f"runner.py recipes/{path.name}" in line for line in lines[:6] if line.startswith("#"))


def test_list_shows_every_shipped_recipe(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for path in shipped_recipes():
        recipe = load_recipe(path)
        assert path.stem in out and recipe.version in out and recipe.description.split()[0] in out


def test_copy_keeps_comments_and_records_parent_then_diff_shows_edits(tmp_path, capsys):
    mine = tmp_path / "sub" / "mine.yaml"
    assert main(["copy", "code-gen", str(mine)]) == 0
    original = (ROOT / "recipes" / "code-gen.yaml").read_text()
    copied = mine.read_text()
    # The copy is the parent line for line (comments included), plus the lineage record, except its
    # header's first line, which names the copy and its parent, and the parent's own command line.
    record_lines = 5
    body = [line for line in copied.splitlines() if "$schema" not in line]
    start = next(i for i, line in enumerate(body) if line.startswith("# Copied with"))
    parent = [line for line in original.splitlines() if "$schema" not in line]
    version = load_recipe(ROOT / "recipes/code-gen.yaml").version
    assert body[0] == f"# mine: a copy of code-gen {version}; say here what it is for. code-gen's notes:"
    assert parent[0].startswith("# code-gen")
    expected = [line.replace("recipes/code-gen.yaml", str(mine)) for line in parent[1:start]]
    # ... and its data path, which still names the same file from the copy's folder (absolute when
    # the copy and the checkout share no folder but the root, relative when they do).
    sample = path_from(mine.parent, str(ROOT / "data_samples" / "code_chat.jsonl"))
    moved = [line.replace("../data_samples/code_chat.jsonl", sample) for line in parent[start:]]
    assert body[1:start] == expected and body[start + record_lines :] == moved != parent[start:]
    assert "# yaml-language-server: $schema=../" in copied  # still points at the schema from its new place
    record = yaml.safe_load(copied)["parent"]
    assert record == {
        "name": "code-gen",
        "version": load_recipe(ROOT / "recipes/code-gen.yaml").version,
        "sha256": file_sha256(ROOT / "recipes/code-gen.yaml"),
    }
    capsys.readouterr()

    assert main(["diff", str(mine)]) == 0
    assert "resolves to the same values" in capsys.readouterr().out

    mine.write_text(
        copied.replace("r: 32 ", "r: 64 ").replace("learning_rate: 1.0e-4", "learning_rate: 5.0e-5")
    )
    assert main(["diff", str(mine)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["lora.r: 32 -> 64", "train.learning_rate: 0.0001 -> 5e-05"]


def test_copy_never_overwrites(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    target.write_text("my work\n")
    assert main(["copy", "smoke", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "my work\n"


def test_diff_notes_a_parent_that_changed_since_the_copy(tmp_path, capsys):
    parent = tmp_path / "base.yaml"
    parent.write_text((ROOT / "recipes" / "smoke.yaml").read_text())
    child = tmp_path / "child.yaml"
    assert main(["copy", str(parent), str(child)]) == 0
    parent.write_text(parent.read_text().replace("version: 1.0.0", "version: 1.1.0").replace("r: 8", "r: 4"))
    capsys.readouterr()
    assert main(["diff", str(child)]) == 0
    out = capsys.readouterr().out
    assert "changed since the copy (copied at version 1.0.0, now 1.1.0)" in out
    assert "lora.r: 4 -> 8" in out and 'version: "1.1.0" -> "1.0.0"' in out


def test_copy_of_a_copy_records_only_its_own_parent(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["copy", "smoke", str(first)]) == 0
    assert main(["copy", str(first), str(second)]) == 0
    text = second.read_text()
    assert text.count("parent:") == 1 and text.count("# Copied with") == 1
    assert yaml.safe_load(text)["parent"]["name"] == str(first)


def test_diff_against_extends_parent(tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text("extends: smoke\ntrain:\n  max_steps: 5\n")
    assert main(["diff", str(child)]) == 0
    assert capsys.readouterr().out.strip() == "train.max_steps: 30 -> 5"


def test_diff_without_parent_is_a_clear_error(capsys):
    assert main(["diff", "recipes/smoke.yaml"]) == 2
    assert "has no parent" in capsys.readouterr().err


def test_show_prints_resolved_recipe_with_overrides(capsys):
    assert main(["show", "smoke", "train.gradient_accumulation_steps=3"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["train"]["gradient_accumulation_steps"] == 3
    assert resolved["lora"]["dropout"] == 0.0  # defaults are filled in
    assert "effective batch: 6 sequences per optimizer step (2 x 3 accumulation)" in out
    assert "# schedule: cosine, 30 optimizer steps" in out and "# warmup: 3 steps (10.0% of training)" in out


# The card each GPU recipe is written for; a new shipped recipe must say which it is.
TARGET_CARDS = {
    "code-gen": "rtx-4090",
    "instruct-alpaca": "rtx-4090",
    "code-gen-16k": "rtx-4090",
    "code-gen-80gb": "h100",
    "llama-3.2-1b": "rtx-4090",  # its budget.max_memory_gib is 8
    "llama-3.2-3b": "rtx-4090",  # and 12
    "llama-3.1-70b": "h100",
    "code-dpo": "rtx-4090",
    "code-orpo": "rtx-4090",
    "code-grpo": "rtx-4090",
}


def test_every_gpu_recipe_names_its_card():
    assert set(TARGET_CARDS) == {p.stem for p in shipped_recipes()} - {"smoke"}


@pytest.mark.parametrize("name, card", TARGET_CARDS.items())
def test_each_gpu_recipe_fits_its_card_with_every_micro_batch_at_full_length(name, card):
    out = run_cli("plan", f"recipes/{name}.yaml", "--gpu", card, "--full-length", "--json")
    document = json.loads(out.stdout.splitlines()[0])
    failed = [v for v in document["budget"]["verdicts"] if not v["ok"]]
    assert document["budget"]["ok"] and not failed, failed
    # The disk verdict is this machine's free space (the 70B download alone is 37 GiB), not the
    # recipe's: a plan refused for the disk alone (exit 3) still shows the recipe fits its card.
    short_of_disk = [v for v in document["disk"]["verdicts"] if not v["ok"]]
    assert out.returncode == (3 if short_of_disk else 0), out.stderr
    assert document["parameters"]["trainable"] > 0
