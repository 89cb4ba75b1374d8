"""The chaos benchmark in small: the smoke run killed with SIGKILL while loading the model and while
writing a checkpoint, recovered the way a user would, ends with the uninterrupted run's adapter,
tensor for tensor, and leaves nothing behind (`make chaos` draws more kills; the README quotes it)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402


def test_two_kills_at_seeded_moments_recover_exactly(tmp_path, capsys, monkeypatch):
    # 6 steps, not the benchmark's 12: still three checkpoints to be killed while writing, and each of
    # the five runs (the uninterrupted one, two killed, two recovered) trains half as long.
    monkeypatch.setattr(chaos, "RECIPE", ["recipes/smoke.yaml", "train.max_steps=6", "train.save_steps=2"])
    code = chaos.main(
        [
            "--kills",
            "2",
            "--seed",
            "3",
            "--phases",
            "model loading,checkpoint writing",
            "--work",
            str(tmp_path),
            "--json",
            str(tmp_path / "chaos.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 of 2 kills recovered exactly (seed 3)" in out and "left behind: 0 items in all (nothing)" in out
    results = json.loads((tmp_path / "chaos.json").read_text())["results"]
    # Aimed by the phase's start and a seeded delay into it; a checkpoint is written in a fraction of
    # a second, so that kill may land just after it (the README's larger run shows where kills land).
    assert results[0]["killed_during"] == "model loading" and results[0]["recovery"].startswith("resume ")
    assert results[1]["killed_during"] in ("checkpoint writing", "training"), out
