"""What `export` merges into, and whether there is room, decided before anything heavy is imported."""

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from huggingface_hub import constants

from finetune.base.errors import UserError
from finetune.export import merging
from finetune.models.shapes import count_parameters, shipped_config
from finetune.plan import disk
from finetune.plan.constants import GIB
from finetune.recipe.schema import load_recipe
from finetune.runs import run_folder

ROOT = Path(__file__).resolve().parent.parent
FOUR_BIT = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
ORIGINAL = "unsloth/Meta-Llama-3.1-8B-Instruct"


def cache_snapshot(cache: Path, repo_id: str, quantized: bool) -> Path:
    """A hub snapshot in a Hugging Face cache, as far as export looks (its config.json)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    folder = repo / "snapshots" / "abc123"
    folder.mkdir(parents=True)
    config = {k: v for k, v in shipped_config(FOUR_BIT).items() if k != "quantization_config"}
    if quantized:  # as Unsloth's pre-quantized repositories have it
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


def code_gen():
    return load_recipe(ROOT / "recipes" / "code-gen.yaml")


def test_the_sixteen_bit_original_on_disk_is_the_merge_base(cache):
    cache_snapshot(cache, FOUR_BIT, quantized=True)
    original = cache_snapshot(cache, ORIGINAL, quantized=False)
    base = merging.merge_base(code_gen())
    assert (base.name, base.path, base.dequantize, base.download_bytes) == (ORIGINAL, original, False, 0)
    assert base.why == f"merged into {ORIGINAL} (16-bit, on disk)"


def test_offline_a_four_bit_base_is_dequantized_and_said_so(cache, monkeypatch):
    four_bit = cache_snapshot(cache, FOUR_BIT, quantized=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(merging, "hub_reachable", lambda: pytest.fail("offline: the hub is not asked"))
    base = merging.merge_base(code_gen())
    assert (base.name, base.path, base.dequantize) == (FOUR_BIT, four_bit, True)
    assert "dequantized to 16 bits, the weights the adapter was trained against" in base.why
    assert f"`hf download {ORIGINAL}` and export again" in base.why


def test_online_the_original_is_downloaded_after_saying_how_large(cache, monkeypatch):
    cache_snapshot(cache, FOUR_BIT, quantized=True)
    monkeypatch.setattr(merging, "hub_reachable", lambda: True)
    monkeypatch.setattr(merging, "remote_size", lambda repo: {ORIGINAL: 16 * GIB}[repo])
    base = merging.merge_base(code_gen())
    assert (base.name, base.path, base.dequantize, base.download_bytes) == (ORIGINAL, None, False, 16 * GIB)
    assert base.why == f"merged into {ORIGINAL} (16-bit, downloaded: 16.0 GiB)"


def test_a_base_model_gone_from_disk_is_one_sentence(cache):
    with pytest.raises(UserError, match=f"the run's base model {FOUR_BIT} is not on disk any more"):
        merging.merge_base(code_gen())


def test_a_local_sixteen_bit_folder_is_merged_into_as_it_is(tmp_path):
    folder = tmp_path / "my-model-bnb-4bit"  # a 4-bit-looking name, but a 16-bit local folder
    folder.mkdir()
    config = {k: v for k, v in shipped_config(FOUR_BIT).items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml", [f"model.name={folder}"])
    base = merging.merge_base(recipe)
    assert (base.path, base.dequantize) == (folder.resolve(), False)


Usage = namedtuple("Usage", "total used free")


def test_export_is_refused_when_the_merged_model_or_the_download_cannot_fit(cache, monkeypatch, tmp_path):
    recipe = code_gen()
    merged = merging.merged_bytes(recipe)
    # The same figure `plan` prints: 8.03e9 parameters in 16 bits, the tokenizer, the small files.
    assert merged == disk.merged_bytes(count_parameters(shipped_config(FOUR_BIT)), None)
    assert 14.9 * GIB < merged < 15.0 * GIB
    out = tmp_path / "out" / "merged"
    free = {"bytes": 20 * GIB}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, free["bytes"]))
    here = merging.MergeBase(FOUR_BIT, tmp_path, True, "dequantized")
    merging.check_room(recipe, here, out)  # 15 GiB into 20 GiB free: room
    # The 16 GiB download and the 15 GiB merge share this filesystem: 31 GiB needed, 20 free.
    download = merging.MergeBase(ORIGINAL, None, False, "downloaded", 16 * GIB)
    with pytest.raises(UserError) as refused:
        merging.check_room(recipe, download, out)
    # 14.97 GiB of merged model (as refused alone below) and the 16 GiB download.
    assert str(refused.value) == (
        f"export: not enough disk for the merged model in {out}: 30.97 GiB "
        "needed there, 20.00 GiB free; free some space or choose --out elsewhere"
    )
    free["bytes"] = 10 * GIB
    with pytest.raises(UserError, match=f"not enough disk for the merged model in {out}: 14.97 GiB"):
        merging.check_room(recipe, here, out)


def test_export_is_refused_without_the_ram_to_merge_in(cache, monkeypatch, tmp_path):
    import psutil

    Memory = namedtuple("Memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(4 * GIB))
    base = merging.MergeBase(FOUR_BIT, tmp_path, True, "dequantized")
    with pytest.raises(UserError, match=r"merging needs about 15.0 GiB of RAM .*, 4.0 GiB is available"):
        merging.check_room(code_gen(), base, tmp_path / "merged")


def test_the_merged_folder_says_which_base_it_is(tmp_path):
    base = merging.MergeBase(FOUR_BIT, tmp_path, True, "merged into X dequantized to 16 bits")
    text = merging.readme(tmp_path, base)
    assert f"The adapter of the run {tmp_path.resolve()} merged into X dequantized to 16 bits." in text


# --- the folder an export writes into (run.export_folder) ---------------------------------------


def test_an_export_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "merged"
    with run_folder.export_folder(out, tmp_path, "the merged model") as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        assert not out.exists()  # nothing at OUT while it is being written
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder, no lock


class Saver:
    """Stands in for a PEFT model or a tokenizer: writes its files, or dies after the first."""

    def __init__(self, files: dict[str, str], dies: bool = False):
        self.files, self.dies = files, dies

    def save_pretrained(self, folder):
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text)
            if self.dies:
                raise KeyboardInterrupt  # killed midway


def test_the_adapter_replaces_the_old_one_only_once_saved_whole(tmp_path):
    """A save that dies midway leaves the earlier adapter (or none), never a folder that looks
    finished (its config written) and is not."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("old")
    model = Saver({"adapter_config.json": "new", "adapter_model.safetensors": "weights"}, dies=True)
    with pytest.raises(KeyboardInterrupt):
        run_folder.save_adapter(model, Saver({"tokenizer.json": "t"}), adapter, tmp_path)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json"]
    assert (adapter / "adapter_config.json").read_text() == "old"
    model.dies = False  # the next save (a resume's) removes what the dead one left
    run_folder.save_adapter(model, Saver({"tokenizer.json": "t"}), adapter, tmp_path)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="converter failed"):
        with run_folder.export_folder(out, tmp_path, "the merged model") as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("converter failed")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path):
    out = tmp_path / "merged"
    left = tmp_path / ".merged.partial"
    left.mkdir()
    (left / "model-00001-of-00002.safetensors").write_bytes(b"half")  # SIGKILLed mid-write
    (tmp_path / ".merged.lock").write_text("12345")  # its lock file; the kernel dropped the lock
    with run_folder.export_folder(out, tmp_path, "the merged model") as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_export_still_writing_is_not_disturbed(tmp_path):
    out = tmp_path / "merged"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path / ".merged.lock")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / ".merged.partial").mkdir()
        (tmp_path / ".merged.partial" / "model.safetensors").write_bytes(b"being written")
        with pytest.raises(UserError, match=rf"another export \(process {holder.pid}\) is writing .*merged"):
            with run_folder.export_folder(out, tmp_path, "the merged model"):
                pass
        assert (tmp_path / ".merged.partial" / "model.safetensors").read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()


HOLD_AND_WAIT = """
import sys, time
from pathlib import Path
from finetune.base import locks
assert locks.hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_an_export_gets_the_permissions_of_the_users_other_files(tmp_path):
    """A library writing through a private temporary file left model.safetensors 0600 beside 0644
    files; what an export (or a saved adapter) holds is made readable as the umask says."""
    import os
    import stat

    from finetune.runs.run_folder import folder_whole

    umask = os.umask(0o022)
    try:
        with folder_whole(tmp_path / "merged") as staging:
            (staging / "model.safetensors").write_bytes(b"weights")
            (staging / "model.safetensors").chmod(0o600)
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
