"""The smoke test: every shipped recipe, shrunk onto the tiny Llama 3, trained and checked against
stored bands, so a change in our code or in Unsloth, TRL, transformers, PEFT or bitsandbytes that
changes what training does shows up as a number outside its band.

A recipe in smoke mode keeps its data, masking, LoRA settings, optimizer and schedule shape, and
swaps the model for the tiny Llama 3 (random weights, the real tokenizer), a short sequence limit,
a fixed number of steps and a learning rate large enough to move a random model (at a real
recipe's 1e-4 the tiny model's loss barely moves, and a band could not tell training from none).
The checks: the loss at fixed steps (against a reference run, with a tolerance), the trainable
parameter count, the adapter saved, reloaded and generating, and on a GPU predicted against
measured peak memory and step time. Bands live in finetune/cli/smoke_bands.json, one set per device
kind, and change only through `runner.py smoke --update-bands`, which prints every difference.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

from finetune import lifecycle
from finetune.base.console import print_lines, print_table
from finetune.base.errors import UserError
from finetune.base.files import CHECKOUT, write_json
from finetune.data.store import prepared_data
from finetune.plan.calibration import measured_peak_bytes
from finetune.plan.devices import detect_gpus
from finetune.recipe.documents import find_recipe, shipped_recipes
from finetune.recipe.schema import Recipe, load_recipe
from finetune.runs.outcome import early_stop_step
from finetune.runs.run_folder import check_writable, installed_versions

BANDS_FILE = Path(str(files("finetune.cli"))) / "smoke_bands.json"
SMOKE_STEPS = 12
LOSS_STEPS = (1, 4, 8, 12)  # where the loss is compared with its band
LOSS_TOLERANCE = {"cpu": 0.01, "cuda": 0.05}  # relative; GPU kernels differ more between versions
MEMORY_TOLERANCE = 0.10  # the budget targets: peak memory within 10%
STEP_TOLERANCE = 0.15  # and step time within 15%


def smoke_overrides(recipe: Recipe, output_dir: Path) -> list[str]:
    """What turns a shipped recipe into its smoke version (everything else is kept)."""
    overrides = [
        "model.name=tiny-llama-3",
        f"model.max_seq_length={min(recipe.model.max_seq_length, 1024)}",
        f"train.max_steps={SMOKE_STEPS}",
        "train.learning_rate=1.0e-2",
        "train.logging_steps=1",
        "budget.max_memory_gib=null",
        "budget.max_step_seconds=null",
        "budget.max_hours=null",
        f"output.dir={output_dir}",
        "output.samples=1",
        "output.sample_tokens=8",
    ]
    if recipe.train.warmup_steps is not None and recipe.train.warmup_steps >= SMOKE_STEPS:
        overrides.append("train.warmup_steps=2")
    if recipe.train.grpo():  # short completions: a random model writes to the limit
        overrides += ["train.max_completion_length=32", "evaluate.humaneval=false"]
    return overrides


def curve_key(recipe: Recipe) -> str:
    """What the bands follow over the steps: the loss, or GRPO's mean reward (its loss is an
    advantage-weighted sum around 0, whose relative change says nothing)."""
    return "reward" if recipe.train.grpo() else "loss"


@dataclass
class Check:
    recipe: str
    name: str
    expected: str
    got: str
    ok: bool


def pins() -> dict[str, str]:
    """The exact versions requirements*.txt pin, by normalized package name."""
    pinned = {}
    for file in ("requirements.txt", "requirements-unsloth.txt"):
        for line in (CHECKOUT / file).read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pinned[name.lower().replace("-", "_")] = version
    return pinned


def drift(installed: dict[str, str | None]) -> list[str]:
    """One line per watched package whose installed version is not the pinned one (the canary's news)."""
    pinned = pins()
    return [
        f"{name} {pinned.get(name.lower())} -> {version}"
        for name, version in installed.items()
        if pinned.get(name.lower()) not in (None, version)
    ]


def smoke_recipe(recipe_path: Path, output_dir: Path) -> dict:
    """Train one recipe in smoke mode and take the figures its bands cover."""

    # The one lifecycle `runner.py train` runs, so the run folder holds the same files (plan.json,
    # budget.json, report.md) and the predictions held to measurements are the ones a user sees.
    # Quiet: the smoke's own table is its output. Forced: the shrunken recipe has no budget to hold.
    overrides = smoke_overrides(load_recipe(recipe_path), output_dir)
    recipe = load_recipe(recipe_path, overrides, inputs_must_exist=True)
    start = time.perf_counter()
    # GRPO's tests reward runs the sampled completions, confined (consent given here: the smoke's
    # own recipes; no evaluation after training is run, the shrunken recipes turn it off).
    ended = lifecycle.train_run(
        recipe,
        str(recipe_path),
        overrides,
        name=recipe_path.stem,
        probe=False,
        force=True,
        allow=recipe.train.grpo(),
        say=_quiet,
    )
    seconds = time.perf_counter() - start
    if ended.how != "done":
        raise RuntimeError(f"the run ended {ended.how}: {' '.join(ended.lines)}".strip())
    job, run_dir, result = ended.job, ended.run_dir, ended.result
    device, budget = job.device, job.budget
    from finetune.train import inference  # heavy: unsloth, torch (imported by the run already)

    key = curve_key(recipe)
    losses = {entry["step"]: entry[key] for entry in result.log_history if key in entry}
    reloaded, tokenizer = inference.load_adapter(result.adapter_dir, recipe.model.max_seq_length)
    answer = inference.generate(reloaded, tokenizer, "Write a Python function that adds two numbers.", 8)
    examples = list(prepared_data(recipe).examples(limit=4))
    if recipe.train.grpo():  # a task's row is all prompt, none of it trained: its tokens scored
        examples = [replace(example, labels=list(example.input_ids)) for example in examples]
    reloaded_loss = inference.mean_loss(reloaded, examples)
    figures = {
        "recipe": recipe_path.stem,
        "device": device.name,
        "kind": "cuda" if device.is_gpu else "cpu",
        "seconds": seconds,
        "steps": result.steps,
        "curve": key,
        "loss": {str(step): losses.get(step) for step in LOSS_STEPS},
        "trainable_parameters": adapter_parameters(result.adapter_dir),
        "reloaded_answer": answer,
        "reloaded_loss": reloaded_loss,
        "run_dir": str(run_dir),
    }
    if recipe.train.keeps_best():  # early stopping and the best checkpoint, checked by their rules
        metric = recipe.train.best_metric()
        figures["best"] = {
            "evaluations": [
                [entry["step"], entry[metric]] for entry in result.log_history if metric in entry
            ],
            "step": result.best.step if result.best else None,
            "last_step": result.steps,
            "patience": recipe.train.early_stopping_patience,
            "threshold": recipe.train.early_stopping_threshold or 0.0,
            "adapter_is_best": result.best is not None
            and same_weights(result.adapter_dir, run_dir / "checkpoints" / f"checkpoint-{result.best.step}"),
        }
    if device.is_gpu and budget is not None:
        figures["memory"] = {
            "predicted": budget.memory.total,
            "measured": measured_peak_bytes(result.measured.peak_reserved),
        }
        figures["step_seconds"] = {
            "predicted": budget.time.step_seconds,
            "measured": result.measured.median_step_seconds,
        }
    return figures


def _quiet(*lines: str) -> None:
    """The run's own lines, unprinted: the smoke reports in its table."""


def smoke_recipe_or_failure(recipe_path: Path, output_dir: Path) -> dict:
    """smoke_recipe(), or, when the stack fails to import or train at all, that failure as the result:
    a broken upstream release must show up as a failed check with its versions, not a traceback."""
    try:
        return smoke_recipe(recipe_path, output_dir)
    except Exception as exc:  # anything the libraries raise is the finding
        return {"recipe": recipe_path.stem, "kind": _device_kind(), "error": f"{type(exc).__name__}: {exc}"}


def _device_kind() -> str:

    return "cuda" if detect_gpus() else "cpu"


def adapter_parameters(adapter_dir: Path) -> int:
    """Parameters stored in a saved adapter: the LoRA weights that were trained."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="numpy") as tensors:
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())


def same_weights(adapter_dir: Path, checkpoint: Path) -> bool:
    """Whether two saved adapters hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    if not (checkpoint / "adapter_model.safetensors").is_file():
        return False
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(checkpoint / "adapter_model.safetensors"))
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def best_checks(name: str, best: dict) -> list[Check]:
    """The best checkpoint is the evaluation with the lowest metric (the first of equals), early
    stopping ends the run where its patience says, and adapter/ holds that checkpoint's weights."""
    evaluations = [tuple(point) for point in best["evaluations"]]
    lowest = min(evaluations, key=lambda point: point[1])[0] if evaluations else None
    stop = early_stop_step(evaluations, best["patience"], best["threshold"]) if best["patience"] else None
    expected_end = stop or SMOKE_STEPS
    return [
        Check(
            name,
            "best checkpoint",
            f"step {lowest} (lowest eval)",
            f"step {best['step']}",
            best["step"] == lowest,
        ),
        Check(
            name,
            "run ends",
            f"step {expected_end} ({'early stopping' if stop else 'max_steps'})",
            f"step {best['last_step']}",
            best["last_step"] == expected_end,
        ),
        Check(
            name,
            "adapter/ is the best",
            "its weights",
            "same" if best["adapter_is_best"] else "differ",
            best["adapter_is_best"],
        ),
    ]


def _relative(a: float, b: float) -> float:
    if a == b:  # a GRPO reward a random model never earns: 0 both
        return 0.0
    return abs(a - b) / abs(b) if b else math.inf


def check(figures: dict, bands: dict) -> list[Check]:
    """Each measured figure against its band; a recipe or step without a band is a failure."""
    name, kind = figures["recipe"], figures["kind"]
    if "error" in figures:
        return [Check(name, "trains", "no error", figures["error"].splitlines()[0][:80], False)]
    band = bands.get(kind, {}).get(name)
    if band is None:
        return [Check(name, "bands", f"a {kind} band", "none stored (runner.py smoke --update-bands)", False)]
    checks = []
    tolerance = LOSS_TOLERANCE[kind]
    for step, expected in band["loss"].items():
        got = figures["loss"].get(step)
        if expected is None:  # the reference run stopped early, before this step: so must this one
            checks.append(
                Check(
                    name,
                    f"loss at step {step}",
                    "not reached",
                    "missing" if got is None else f"{got:.4f}",
                    got is None,
                )
            )
            continue
        ok = got is not None and math.isfinite(got) and _relative(got, expected) <= tolerance
        shown = "missing" if got is None else f"{got:.4f}"
        what = figures.get("curve", "loss")
        checks.append(Check(name, f"{what} at step {step}", f"{expected:.4f} +/-{tolerance:.0%}", shown, ok))
    expected = band["trainable_parameters"]
    got = figures["trainable_parameters"]
    checks.append(Check(name, "trainable parameters", f"{expected:,}", f"{got:,}", got == expected))
    # The saved adapter, loaded again: the loss it gives the first rows (a lost or mangled save
    # gives the untrained model's), and some generated text.
    expected, got = band.get("reloaded_loss"), figures["reloaded_loss"]
    ok = expected is not None and math.isfinite(got) and _relative(got, expected) <= tolerance
    shown = "none stored" if expected is None else f"{expected:.4f} +/-{tolerance:.0%}"
    checks.append(Check(name, "reloaded adapter's loss", shown, f"{got:.4f}", ok))
    answer = figures["reloaded_answer"]
    checks.append(
        Check(name, "reloaded adapter generates", "some text", repr(answer[:20]), bool(answer.strip()))
    )
    if "best" in figures:
        checks += best_checks(name, figures["best"])
    for key, tolerance in (("memory", MEMORY_TOLERANCE), ("step_seconds", STEP_TOLERANCE)):
        if key in figures and figures[key]["measured"]:
            predicted, measured = figures[key]["predicted"], figures[key]["measured"]
            error = predicted / measured - 1
            checks.append(
                Check(
                    name,
                    f"{key} predicted vs measured",
                    f"+/-{tolerance:.0%}",
                    f"{error:+.1%}",
                    abs(error) <= tolerance,
                )
            )
    return checks


def verdict(results: list[dict], bands: dict) -> tuple[list[Check], dict]:
    """Every result's checks, and the smoke's result document (checks, figures, installed versions)."""
    checks = [c for figures in results for c in check(figures, bands)]
    installed = installed_versions()
    document = {
        "ok": all(c.ok for c in checks),
        "versions": installed,
        "differing_from_pins": drift(installed),
        "results": results,
        "checks": [vars(c) for c in checks],
    }
    return checks, document


def new_bands(results: list[dict], bands: dict) -> tuple[dict, list[str]]:
    """The bands with these results as the reference, and one line per value that changes."""
    updated = json.loads(json.dumps(bands))
    changes = []
    for figures in results:
        if "error" in figures:
            raise UserError(f"smoke: {figures['recipe']} failed ({figures['error']}); no bands were changed")
        kind, name = figures["kind"], figures["recipe"]
        new = {
            "loss": figures["loss"],
            "trainable_parameters": figures["trainable_parameters"],
            "reloaded_loss": figures["reloaded_loss"],
        }
        old = bands.get(kind, {}).get(name, {})
        for step, value in new["loss"].items():
            before = old.get("loss", {}).get(step)
            if before != value:
                changes.append(f"{kind} {name} loss at step {step}: {before} -> {value}")
        if old.get("reloaded_loss") != new["reloaded_loss"]:
            changes.append(
                f"{kind} {name} reloaded adapter's loss: {old.get('reloaded_loss')} -> {new['reloaded_loss']}"
            )
        if old.get("trainable_parameters") != new["trainable_parameters"]:
            before, after = old.get("trainable_parameters"), new["trainable_parameters"]
            changes.append(f"{kind} {name} trainable parameters: {before} -> {after}")
        updated.setdefault(kind, {})[name] = new
    return updated, changes


def bands_file(path: Path | None, update: bool) -> Path:
    """The bands file to use (--bands, else the shipped one): one to check against must exist."""
    if path is not None and not path.is_file() and not update:
        raise UserError(f"--bands '{path}' does not exist; --update-bands writes it")
    return path or BANDS_FILE


def load_bands(path: Path = BANDS_FILE) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_smoke(names: list[str], update: bool, json_path: Path, output: Path, bands_arg: Path | None) -> int:
    """`runner.py smoke`: every shipped recipe (or the named ones) in smoke mode, checked against the
    stored bands; the exit code."""
    paths = [find_recipe(name) for name in names] if names else shipped_recipes()
    bands = bands_file(bands_arg, update)
    # Both are written after minutes of training: a path that cannot be written fails now.
    check_writable(bands if update else json_path, "--bands" if update else "--json")
    check_writable(output, "--output", folder=True)
    results = [smoke_recipe_or_failure(path, output) for path in paths]
    if update:
        updated, changes = new_bands(results, load_bands(bands))
        write_json(bands, updated)
        print_lines(*(changes or ["no band changes"]), f"bands written to {bands}")
        return 0
    checks, document = verdict(results, load_bands(bands))
    ok = {True: "[green]ok[/green]", False: "[bold red]FAIL[/bold red]"}
    print_table(
        ("recipe", "check", "band", "measured", ""),
        [(c.recipe, c.name, c.expected, c.got, ok[c.ok]) for c in checks],
    )
    if document["differing_from_pins"]:
        print_lines(f"versions differing from the pins: {', '.join(document['differing_from_pins'])}")
    write_json(json_path, document)
    passed = sum(c.ok for c in checks)
    print_lines(f"{passed} of {len(checks)} checks within their bands; result in {json_path}")
    return 0 if document["ok"] else 1
