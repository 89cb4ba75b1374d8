"""One test per private or undocumented library API that finetune/base/internals.py uses, named after it,
so a release that removes or changes one fails here by that name (`make canary`)."""

from finetune.base import internals


def test_huggingface_hub_cache_layout_refs_main_to_snapshots(tmp_path, monkeypatch):
    """Our reading of the cache agrees with huggingface_hub's own: a file laid out the way we read
    it is the file the library's lookup returns, and refs/main names the snapshot's commit."""
    from huggingface_hub import constants, try_to_load_from_cache

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    theirs = try_to_load_from_cache("org/model", "config.json", cache_dir=tmp_path)
    assert (
        internals.hub_cached_file("org/model", "config.json") == repo / "snapshots" / commit / "config.json"
    )
    assert str(internals.hub_cached_file("org/model", "config.json")) == theirs
    assert internals.hub_snapshot("org/model") == (commit, repo / "snapshots" / commit)
    assert internals.hub_cached_file("org/model", "missing.json") is None
    assert internals.hub_snapshot("org/other") is None


def test_datasets_Dataset_fingerprint():
    from datasets import Dataset

    rows = Dataset.from_dict({"x": [1, 2, 3]})
    fingerprint = internals.dataset_fingerprint(rows)
    assert isinstance(fingerprint, str) and fingerprint
    # It follows the content: a transform gives another fingerprint.
    assert internals.dataset_fingerprint(rows.map(lambda r: {"x": r["x"] + 1})) != fingerprint
