"""The nightly smoke's checks: figures against bands, band updates, drift from the pins (pure)."""

from finetune.cli import smoke


def figures(**changes):
    base = {
        "recipe": "smoke",
        "kind": "cpu",
        "loss": {"1": 12.0, "12": 10.0},
        "trainable_parameters": 45056,
        "reloaded_loss": 10.2,
        "reloaded_answer": "def f",
    }
    return {**base, **changes}


BANDS = {
    "cpu": {"smoke": {"loss": {"1": 12.0, "12": 10.0}, "trainable_parameters": 45056, "reloaded_loss": 10.2}}
}


def test_a_figure_outside_its_band_fails_and_a_missing_band_is_a_failure():
    assert all(c.ok for c in smoke.check(figures(loss={"1": 12.05, "12": 9.95}), BANDS))  # within 1%
    failed = [c.name for c in smoke.check(figures(loss={"1": 12.0, "12": 10.2}), BANDS) if not c.ok]
    assert failed == ["loss at step 12"]
    failed = [
        c.name for c in smoke.check(figures(loss={"1": 12.0}, trainable_parameters=1), BANDS) if not c.ok
    ]
    assert failed == ["loss at step 12", "trainable parameters"]
    assert not smoke.check(figures(reloaded_loss=12.0), BANDS)[-2].ok  # the save was lost
    assert not smoke.check(figures(reloaded_answer=" "), BANDS)[-1].ok
    (broken,) = smoke.check(
        {"recipe": "smoke", "kind": "cpu", "error": "NotImplementedError: You need a GPU."}, BANDS
    )
    assert not broken.ok and broken.name == "trains" and broken.got == "NotImplementedError: You need a GPU."
    (missing,) = smoke.check(figures(kind="cuda"), BANDS)
    assert not missing.ok and "--update-bands" in missing.got
    on_gpu = figures(
        kind="cuda",
        memory={"predicted": 1.2e9, "measured": 1.0e9},
        step_seconds={"predicted": 1.0, "measured": 1.1},
    )
    checks = {c.name: c for c in smoke.check(on_gpu, {"cuda": BANDS["cpu"]})}
    assert not checks["memory predicted vs measured"].ok and checks["step_seconds predicted vs measured"].ok


def test_new_bands_show_every_difference():
    updated, changes = smoke.new_bands([figures(loss={"1": 12.0, "12": 9.0})], BANDS)
    assert changes == ["cpu smoke loss at step 12: 10.0 -> 9.0"]
    assert updated["cpu"]["smoke"]["loss"]["12"] == 9.0 and BANDS["cpu"]["smoke"]["loss"]["12"] == 10.0
    assert smoke.drift({"trl": "9.9.9", "torch": smoke.pins()["torch"]}) == [
        f"trl {smoke.pins()['trl']} -> 9.9.9"
    ]
