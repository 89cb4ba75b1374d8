"""Where a recipe's relative paths point (finetune/recipe/paths.py): from the recipe file's own
folder, from any working directory; overrides from the current one; saved runs absolute."""

import json
import os

import pytest
import yaml
from cli_helpers import ROOT, run_cli
from test_recipe_verbs import TARGET_CARDS

from finetune.recipe.documents import shipped_recipes
from finetune.recipe.paths import path_from
from finetune.recipe.schema import dump_recipe, load_recipe
from finetune.runs.run_folder import run_recipe

SAMPLE = ROOT / "data_samples" / "code_chat.jsonl"


@pytest.mark.slow
def test_every_shipped_recipe_validates_and_plans_from_another_directory(tmp_path):
    names = [p.stem for p in shipped_recipes()]
    out = run_cli("validate", *names, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(f"ok {name} (" in out.stdout for name in names)
    for name in names:
        card = ["--gpu", TARGET_CARDS[name]] if name in TARGET_CARDS else []
        plan = run_cli("plan", name, "--json", *card, cwd=tmp_path)
        document = json.loads(plan.stdout.splitlines()[0])
        # A refusal for this machine's free disk alone (the 70B's download) is no path problem.
        short_of_disk = any(not v["ok"] for v in document["disk"]["verdicts"])
        assert plan.returncode == (3 if short_of_disk else 0), (name, plan.stderr)
        assert document["data"]["rows"] > 0 and "Traceback" not in plan.stderr
    assert not list(tmp_path.iterdir())  # --json: nothing written where it ran


def test_a_recipe_reads_its_data_beside_itself_and_an_override_from_the_current_directory(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.jsonl").write_bytes(SAMPLE.read_bytes())
    recipe = project / "recipes" / "mine.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        (ROOT / "recipes" / "smoke.yaml")
        .read_text()
        .replace("../data_samples/code_chat.jsonl", "../data/rows.jsonl")
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "eval.jsonl").write_bytes(SAMPLE.read_bytes())
    out = run_cli(
        "plan", str(recipe), "--json", "data.eval=eval.jsonl", "data.eval_overlap=allow", cwd=elsewhere
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[0])["data"]["rows"] == 40
    (elsewhere / "eval.jsonl").unlink()  # the override's file was the one in the current directory
    out = run_cli(
        "plan", str(recipe), "--json", "data.eval=eval.jsonl", "data.eval_overlap=allow", cwd=elsewhere
    )
    assert out.returncode == 2 and f"{elsewhere}/eval.jsonl does not exist" in out.stderr
    loaded = load_recipe(recipe)
    assert loaded.data.train == [str(project / "data" / "rows.jsonl")]  # outside the cwd: absolute
    os.chdir(project)  # below the current directory: the short form messages show
    try:
        assert load_recipe(recipe).data.train == ["data/rows.jsonl"]
    finally:
        os.chdir(ROOT)


def test_a_missing_data_file_names_the_recipe_line_the_path_tried_and_the_one_that_exists(tmp_path):
    """The mistake of the old rule: a recipe in a subfolder naming data from the directory it is run
    from. The error says where the recipe named it, what was tried, and what to write instead."""
    folder = tmp_path / "mine"
    folder.mkdir()
    recipe = folder / "r.yaml"
    text = (ROOT / "recipes" / "smoke.yaml").read_text().replace("../data_samples/", "data_samples/")
    recipe.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "data_samples/code_chat.jsonl" in row)
    # relative where the two share a folder below the root (a checkout under /tmp), else absolute
    fix = path_from(folder, str(SAMPLE))
    for verb in (["validate"], ["plan"], ["data"], ["show"], []):  # [] is train
        out = run_cli(*verb, str(recipe), cwd=ROOT)
        said = " ".join(out.stderr.split())
        assert out.returncode == 2 and "Traceback" not in out.stderr, (verb, out.stderr)
        assert (
            f"{recipe}:{line}: data.train 'data_samples/code_chat.jsonl': "
            f"{folder}/data_samples/code_chat.jsonl does not exist (a recipe's relative paths are read "
            f"from its own folder); {SAMPLE}, from the current directory, does: write '{fix}'" in said
        ), verb
    recipe.write_text(text.replace("data_samples/code_chat.jsonl", fix))  # the fix it gave
    assert run_cli("validate", str(recipe), cwd=tmp_path).returncode == 0
    # With no other candidate, the path tried alone; an override is named as the writer.
    out = run_cli("validate", str(recipe), "data.eval=nowhere.jsonl", cwd=tmp_path)
    assert out.returncode == 2
    said = " ".join(out.stderr.split())
    assert f"override 'data.eval=nowhere.jsonl': data.eval 'nowhere.jsonl': {tmp_path}/nowhere.jsonl" in said


def test_copy_keeps_the_data_reachable_from_the_copys_folder(tmp_path):
    inside = ROOT / "my-recipes-test" / "deep"
    try:
        out = run_cli("copy", "smoke", str(inside / "mine.yaml"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        written = yaml.safe_load((inside / "mine.yaml").read_text())["data"]["train"]
        assert written == "../../data_samples/code_chat.jsonl"  # beside the checkout: relative
        assert run_cli("validate", str(inside / "mine.yaml"), cwd=tmp_path).returncode == 0
    finally:
        for path in sorted(inside.parent.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        inside.parent.rmdir()


def test_a_run_saves_its_inputs_absolute_and_an_older_run_is_read_from_the_current_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(load_recipe(ROOT / "recipes" / "smoke.yaml")))
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["data"]["train"] == [str(SAMPLE)]
    assert run_recipe(run_dir).data.train == ["data_samples/code_chat.jsonl"]  # shown from ROOT
    # A run saved before the rule held the path as typed from where it started (here ROOT).
    (run_dir / "recipe.yaml").write_text(
        (run_dir / "recipe.yaml").read_text().replace(str(SAMPLE), "data_samples/code_chat.jsonl")
    )
    assert run_recipe(run_dir).data.train == ["data_samples/code_chat.jsonl"]


def test_what_a_resume_compares_is_the_same_from_any_directory(tmp_path):
    """The prepared data's key and each file's fingerprint name files absolutely: a run resumed
    from another directory is not refused as changed, and finds the store it prepared."""
    from finetune.data.store import data_fingerprints, data_tokenizer

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    here = data_fingerprints(recipe, data_tokenizer(recipe))
    os.chdir(tmp_path)
    try:
        elsewhere = load_recipe(ROOT / "recipes" / "smoke.yaml")
        there = data_fingerprints(elsewhere, data_tokenizer(elsewhere))
    finally:
        os.chdir(ROOT)
    assert elsewhere.data.train == [str(SAMPLE)] != recipe.data.train  # shown differently
    assert here == there and f"data {SAMPLE}" in here


def test_a_home_folder_of_no_user_and_a_missing_model_folder_are_named_not_a_traceback(tmp_path):
    """~nosuchuser stays as written (Path.expanduser would raise); a model folder that is not there
    is named with its line, and never taken for a hub id."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"extends: {ROOT / 'recipes' / 'smoke.yaml'}\nmodel:\n  name: ./models/mine\n"
        "data:\n  train: ~nosuchuser/rows.jsonl\n"
    )
    out = run_cli("plan", str(recipe), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    said = " ".join(out.stderr.split())
    assert f"{recipe}:3: model.name './models/mine': {tmp_path}/models/mine does not exist" in said
    assert (
        f"{recipe}:5: data.train '~nosuchuser/rows.jsonl': {tmp_path}/~nosuchuser/rows.jsonl does not exist"
        in said
    )
    (tmp_path / "models" / "mine").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert load_recipe(recipe).model.name == "./models/mine"  # below the cwd, still a folder's name
    finally:
        os.chdir(ROOT)


def test_copy_keeps_anchors_and_weights_keys_follow_the_file_that_wrote_them(tmp_path):
    """A copy rewrites the anchored value, not its &anchor, once for the alias too; a data.weights
    key from a parent in another folder is read from the parent's folder; an empty entry is refused."""
    (tmp_path / "base" / "data").mkdir(parents=True)
    (tmp_path / "base" / "data" / "rows.jsonl").write_bytes(SAMPLE.read_bytes())
    parent = tmp_path / "base" / "parent.yaml"
    parent.write_text(
        f"extends: {ROOT / 'recipes' / 'smoke.yaml'}\n"
        "data:\n  train: &rows data/rows.jsonl\n  eval: *rows\n  weights: {data/rows.jsonl: 2.0}\n"
    )
    child = tmp_path / "child" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../base/parent.yaml\ntrain:\n  max_steps: 5\n")
    loaded = load_recipe(child)
    rows = str(tmp_path / "base" / "data" / "rows.jsonl")
    assert loaded.data.train == loaded.data.eval == [rows] and loaded.data.weights == {rows: 2.0}
    copied = tmp_path / "elsewhere" / "copy.yaml"
    out = run_cli("copy", str(parent), str(copied), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = copied.read_text()
    assert "train: &rows ../base/data/rows.jsonl\n  eval: *rows\n" in text
    assert load_recipe(copied).data == load_recipe(parent).data
    empty = run_cli("validate", str(parent), "data.train=['']", cwd=tmp_path)
    assert empty.returncode == 2 and "an entry is empty" in empty.stderr
