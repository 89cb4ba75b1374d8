"""The cached tiny model is checked before every use: damaged files (truncated, a flipped byte) are
found and the model built again, never loaded as it is."""

from finetune.models import tiny_model


def test_a_damaged_tiny_model_is_built_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    folder = tiny_model.ensure_tiny_model()
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()

    weights.write_bytes(whole[:-100])
    assert tiny_model.ensure_tiny_model() == folder
    said = capsys.readouterr().err
    assert f"the cached tiny model {folder} is damaged (model.safetensors is " in said
    assert weights.read_bytes() == whole  # the same seeded model, built again

    flipped = bytearray(whole)
    flipped[-50] ^= 0x01
    weights.write_bytes(bytes(flipped))
    tiny_model.ensure_tiny_model()
    assert "model.safetensors changed since it was written" in capsys.readouterr().err
    assert weights.read_bytes() == whole

    tiny_model.ensure_tiny_model()
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]
