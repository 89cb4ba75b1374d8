"""Planning and training read one prepared-data store: the run trains on the rows it was planned on."""

import json
import shutil

from cli_helpers import run_cli

from finetune.data.tokenize import llama3_tokenizer_dir


def test_plan_then_train_open_one_store_and_tokenize_once(tmp_path, tiny_model_dir):
    """The run trains on exactly the rows (and token lengths) its plan was made from."""
    cache = tmp_path / "cache"
    built_in = llama3_tokenizer_dir()
    shutil.copytree(built_in, cache / built_in.name)  # copied, not rebuilt
    shutil.copytree(tiny_model_dir, cache / tiny_model_dir.name)
    env = {"FINETUNE_CACHE": str(cache)}
    plan = run_cli("plan", "recipes/smoke.yaml", "--json", env_extra=env)
    assert plan.returncode == 0, plan.stderr
    (store_dir,) = [path for path in (cache / "prepared").iterdir() if path.is_dir()]
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store_dir / "train").iterdir()}
    runs = tmp_path / "runs"
    train = run_cli("recipes/smoke.yaml", "train.max_steps=4", f"output.dir={runs}", env_extra=env)
    assert train.returncode == 0, train.stderr
    assert [path for path in (cache / "prepared").iterdir() if path.is_dir()] == [store_dir]
    # The prepared rows were not written again, and nothing was added beside them (TRL's and
    # Unsloth's dataset steps write their cache files elsewhere).
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (store_dir / "train").iterdir()} == files
    (manifest,) = runs.glob("*/*/manifest.json")
    assert json.loads(manifest.read_text())["fingerprints"]["prepared data"] == store_dir.name
