"""The command line: parse, validate the recipe and data, check the machine, then train.

Everything up to the training call is light (no torch): a bad recipe, bad data or a run that cannot
start here is refused in about a second with one sentence and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from rich.console import Console

from finetune.data import load_conversations
from finetune.preflight import check_can_start
from finetune.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_name

# soft_wrap: never break a message or a path across lines, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner.py",
        description="Fine-tune a language model with LoRA/QLoRA from a recipe YAML.",
        epilog="example: python runner.py recipes/smoke.yaml --set train.max_steps=10",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one recipe value, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )
    return parser


def make_run_dir(recipe: Recipe, name: str) -> Path:
    """A new folder runs/<recipe>/<timestamp>-<hash>; a run never reuses another run's folder."""
    digest = hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:6]
    base = Path(recipe.output.dir) / name / f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")


def run_training(recipe_path: str, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    gpus = check_can_start(recipe, recipe_path)
    conversations = load_conversations(recipe.data)
    device = f"{gpus[0].name} ({gpus[0].memory_gib:.0f} GiB)" if gpus else "CPU"
    name = recipe_name(recipe_path)
    console.print(
        f"[bold]{name}[/bold] {recipe.version}: {recipe.model.name} on {device}, "
        f"{len(conversations)} conversations"
    )

    from finetune import train  # heavy: unsloth, torch, transformers, trl

    run_dir = make_run_dir(recipe, name)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    result = train.train(recipe, conversations, run_dir)
    console.print(
        f"[bold green]Done:[/bold green] {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; adapter saved to {result.adapter_dir}"
    )
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_training(args.recipe, args.overrides)
    except RecipeError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
