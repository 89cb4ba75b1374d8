"""The command line: `python runner.py [VERB] ...`; a bare recipe path means `train`.

Everything except `train` is light (no torch): recipes and data are checked, and a run that cannot
start here is refused, in about a second, with one sentence per problem and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.text import Text

from finetune import lifecycle
from finetune.base import distributed, sandbox
from finetune.base.console import console, err_console, print_lines, print_table, print_warnings, progress_bar
from finetune.base.errors import UserError
from finetune.cli import smoke
from finetune.cli.arguments import json_schema, parse_args, torchrun_argv
from finetune.data.audit import audit_recipe
from finetune.data.store import count_rows
from finetune.evaluate import evaluation
from finetune.export import exporting, gguf_export
from finetune.plan.calibration import BudgetExceeded, calibration_table
from finetune.plan.devices import detect_gpus, training_device
from finetune.plan.job import Job, checked_plan, plan_document, plan_job, training_data
from finetune.plan.preflight import fits_a_cpu
from finetune.plan.schedule import describe_plan
from finetune.recipe import lineage
from finetune.recipe.documents import find_recipe, shipped_recipes
from finetune.recipe.schema import dump_recipe, load_recipe
from finetune.runs import run_folder
from finetune.runs.plots import plot_lengths, plot_schedule
from finetune.train.backend import inference_stack

EXIT_USER_ERROR = 2
EXIT_OVER_BUDGET = 3
EXIT_DIVERGED = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 130


def _print_refusal(job: Job) -> None:
    err_console.print(
        f"[bold red]over budget:[/bold red] {escape(job.source)} is predicted not to fit; "
        "changes that would help:"
    )
    for idea in job.suggestions or ["none of the usual changes is enough; a larger GPU is needed"]:
        err_console.print(f"  {idea}", markup=False)


def cmd_plan(
    recipe_arg: str,
    overrides: list[str],
    as_json: bool,
    png: Path,
    gpu: str | None,
    full_length: bool,
    gpus: int | None = None,
) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides, inputs_must_exist=True)
    if not as_json:
        run_folder.check_writable(png, "--png")
    if gpu is None and not detect_gpus() and not fits_a_cpu(recipe):
        # A plan for this CPU would describe a run the runner refuses; plan for the usual 24 GB card.
        gpu = "rtx-4090"
        err_console.print(
            "note: no GPU here and this model needs one: planned for an RTX 4090; --gpu NAME for another"
        )
    job = plan_job(recipe, str(path), device=training_device(gpu), full_length=full_length, world_size=gpus)
    if as_json:
        document = plan_document(job, job.suggestions)
        print_lines(json.dumps(document))
        return EXIT_OVER_BUDGET if job.over_budget else 0
    print_warnings(job.warnings)
    print_lines(*job.lines())
    print_lines(f"plot: {plot_schedule(job.plan, png)}")
    if job.over_budget:
        _print_refusal(job)
        return EXIT_OVER_BUDGET
    return 0


def cmd_train(
    recipe_arg: str, overrides: list[str], force: bool = False, probe: bool | None = None, allow: bool = False
) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides, inputs_must_exist=True)
    ended = lifecycle.train_run(
        recipe,
        str(path),
        overrides,
        probe=probe,
        force=force,
        allow=allow,
        say=print_lines,
        warn=print_warnings,
    )
    return _report_ending(ended)


def cmd_resume(run_dir: Path, force: bool, allow: bool) -> int:
    """Continue a run from its latest sound checkpoint, with the recipe it was started with."""
    ended = lifecycle.resume_run(run_dir, force=force, allow=allow, say=print_lines, warn=print_warnings)
    return _report_ending(ended)


def _report_ending(ended: lifecycle.Ended) -> int:
    """How the run ended, said in colour: exit 0, or 3 (over budget, out of memory), 4 (diverged), 130."""
    if ended.how == "refused":
        _print_refusal(ended.job)
        err_console.print("Nothing was loaded or trained; --force launches anyway.")
        return EXIT_OVER_BUDGET
    if ended.how == "out of memory":
        err_console.print(f"[bold red]error:[/bold red] {escape(ended.lines[0])}")
        for line in ended.lines[1:]:
            err_console.print(line, markup=False)
        return EXIT_OVER_BUDGET
    result, run_dir = ended.result, ended.run_dir
    if ended.how == "interrupted":
        err_console.print(
            f"[yellow]{result.interrupted_by}:[/yellow] stopped after step {result.steps} with a checkpoint; "
            f"continue with: python runner.py resume {escape(str(run_dir))}"
        )
        return EXIT_INTERRUPTED
    if ended.how == "diverged":
        kept, _ = run_folder.latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved before it"
        err_console.print(
            f"[bold red]diverged:[/bold red] {escape(result.diverged)}; stopped, and no adapter was saved; "
            f"{escape(kept)}. A lower train.learning_rate or train.max_grad_norm usually helps."
        )
        return EXIT_DIVERGED
    return 0  # done (rank 0 said so), or another rank of a torchrun job: rank 0 reports for it


def smoke_verb(*args) -> int:

    return smoke.run_smoke(*args)


def cmd_calibration(folder: Path) -> int:
    """Predicted against measured, over every run under ``folder`` that saved a budget.json."""
    records, damaged = [], []
    for path in sorted(folder.glob("**/budget.json")):
        try:  # one run's damaged record leaves the others' table
            records.append(
                run_folder.read_json(path, "that run is left out", needs=("predicted", "measured"))
            )
        except UserError as exc:
            damaged.append(str(exc))
    print_warnings(damaged)
    if not records:
        raise UserError(f"no run under '{folder}' has a readable budget.json yet; train a recipe first")
    return print_lines(*calibration_table(records))


def cmd_data(recipe_arg: str, overrides: list[str], show: int, png: Path) -> int:
    """The audit: what will be trained, row by row, before anything is."""

    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides, inputs_must_exist=True)
    run_folder.check_writable(png, "--png")
    found = audit_recipe(recipe, show)
    print_lines(*found.lines())
    print_lines(f"histogram: {plot_lengths(found.lengths, recipe.model.max_seq_length, png)}")
    # Trained tokens in bold green on a terminal; between [[ and ]] when piped or without colour.
    marks = ("", "") if console.is_terminal and not console.no_color else ("[[", "]]")
    for source, pieces in found.shown:
        console.rule(f"{source}  (trained tokens {'highlighted' if not marks[0] else 'in [[ ]]'})")
        styled = [(f"{marks[0]}{p}{marks[1]}", "bold green") if t else (p, "dim") for p, t in pieces]
        console.print(Text.assemble(*styled))
    if found.untrained:
        err_console.print(
            f"[bold red]error:[/bold red] {len(found.untrained)} rows would train no token "
            f"after truncation ({escape(', '.join(found.untrained[:3]))}); raise "
            "model.max_seq_length or set data.overlong: drop"
        )
        return EXIT_USER_ERROR
    return 0


def cmd_validate(args: list[str]) -> int:
    """Each recipe named, with the overrides given among them (section.key=value) applied to each."""
    overrides = [arg for arg in args if "=" in arg and not Path(arg).exists()]
    recipe_args = [arg for arg in args if arg not in overrides]
    if not recipe_args:
        raise UserError("validate needs a recipe (a file or a shipped name) before any section.key=value")
    failed = 0
    for arg in recipe_args:
        try:
            recipe = load_recipe(find_recipe(arg), overrides, inputs_must_exist=True)
            rows, report = count_rows(recipe)
            for line in report:
                err_console.print(f"{escape(arg)}: {escape(line)}")
            print_warnings(checked_plan(recipe, rows, arg)[1])
        except UserError as exc:
            failed += 1
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
            continue
        console.print(f"[green]ok[/green] {arg} ({recipe.version}, {rows} training rows)")
    return EXIT_USER_ERROR if failed else 0


def cmd_show(recipe_arg: str, overrides: list[str]) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides, inputs_must_exist=True)
    console.print(dump_recipe(recipe), end="", markup=False)
    batch, accumulation = recipe.train.per_device_train_batch_size, recipe.train.gradient_accumulation_steps
    effective = f"{batch * accumulation} sequences per optimizer step ({batch} x {accumulation} accumulation)"
    print_lines(f"# effective batch: {effective}")
    data = training_data(recipe)
    plan, warnings = checked_plan(recipe, data.sequences, str(path))
    print_warnings(warnings)
    print_lines(*(f"# {line}" for line in data.describe() + describe_plan(plan)))
    return 0


def cmd_list() -> int:
    recipes = [(path.stem, load_recipe(path)) for path in shipped_recipes()]
    print_table(("recipe", "version", "what it is for"), [(n, r.version, r.description) for n, r in recipes])
    return 0


def cmd_copy(source: str, destination: Path) -> int:
    lineage.copy_recipe(source, run_folder.check_writable(destination, "copy destination"))
    console.print(f"Copied {source} to {destination}; edit it, then `python runner.py {destination}`")
    return 0


def cmd_diff(recipe_arg: str) -> int:
    path = find_recipe(recipe_arg)
    parent_path, parent, note = lineage.parent_of(path)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    changes = lineage.diff_recipes(parent, load_recipe(path))
    if not changes:
        console.print(f"{path} resolves to the same values as {parent_path}")
    for key, old, new in changes:
        old_text, new_text = (v if v is lineage.UNSET else json.dumps(v) for v in (old, new))
        print_lines(f"{key}: {old_text} -> {new_text}")
    return 0


def cmd_schema(output: Path | None) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        run_folder.write_user_file(output, text, "--output")
    else:
        console.print(text, end="", markup=False)
    return 0


def cmd_export(run_dir: Path, out: Path | None, quant: str | None) -> int:
    """Merged safetensors (run/merged), or GGUF for llama.cpp and Ollama with ``quant`` (run/gguf)."""
    exporting.export_run(run_dir, out or run_dir / ("gguf" if quant else "merged"), quant, print_lines)
    return 0


def cmd_eval(
    run_dir: Path | None, completions: Path | None, changes: dict, ks: list[int], allow: bool
) -> int:
    """A run's base model and adapter answering the tasks (evaluate.flags checked the flags), or a
    file of completions, scored."""
    if completions is not None:
        tasks = changes.get("tasks", evaluation.HUMANEVAL)
        return print_lines(*evaluation.score_completions(completions, tasks, allow, ks))
    with progress_bar("answering") as progress:
        lines = evaluation.evaluate_run(run_dir, allow, changes, ks, progress)
    return print_lines(*lines)


def cmd_torchrun(args) -> int:
    """`train --gpus N` and `resume --gpus N`: the same command, once per GPU, under torchrun."""
    source = args.recipe if args.verb == "train" else str(args.run_dir / "recipe.yaml")
    if args.verb == "train":
        recipe = load_recipe(find_recipe(source), args.overrides, inputs_must_exist=True)
    else:
        recipe = run_folder.run_recipe(args.run_dir)
    return lifecycle.torchrun(args.gpus, torchrun_argv(args), recipe, source)


def cmd_generate(run_dir: Path, prompt: str, max_new_tokens: int) -> int:
    recipe, _ = run_folder.finished_adapter(run_dir)  # a clear error before the heavy import
    inference = inference_stack(recipe)  # heavy: the run's backend, torch, transformers
    inference.generate_from_run(run_dir, prompt, max_new_tokens)
    return 0


COMMANDS = {
    "train": lambda a: cmd_train(a.recipe, a.overrides, a.force, a.probe, a.allow_code_execution),
    "plan": lambda a: cmd_plan(a.recipe, a.overrides, a.json, a.png, a.gpu, a.full_length, a.gpus),
    "data": lambda a: cmd_data(a.recipe, a.overrides, a.show, a.png),
    "validate": lambda a: cmd_validate(a.recipes),
    "show": lambda a: cmd_show(a.recipe, a.overrides),
    "list": lambda a: cmd_list(),
    "copy": lambda a: cmd_copy(a.source, a.destination),
    "diff": lambda a: cmd_diff(a.recipe),
    "resume": lambda a: cmd_resume(a.run_dir, a.force, a.allow_code_execution),
    "eval": lambda a: cmd_eval(a.run_dir, a.completions, evaluation.flags(a), a.k, a.allow_code_execution),
    "export": lambda a: cmd_export(a.run_dir, a.out, gguf_export.quantization(a.format, a.quant)),
    "generate": lambda a: cmd_generate(a.run_dir, a.prompt, a.max_new_tokens),
    "smoke": lambda a: smoke_verb(a.recipes, a.update_bands, a.json, a.output, a.bands),
    "calibration": lambda a: cmd_calibration(a.runs),
    "schema": lambda a: cmd_schema(a.output),
}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        if getattr(args, "gpus", None) and args.verb in ("train", "resume"):
            return cmd_torchrun(args)
        lifecycle.join_job(args.verb)
        if getattr(args, "allow_unconfined_code", False):
            sandbox.allow_unconfined()
        if not distributed.is_main():
            console.quiet = True  # rank 0 prints for the job
        return COMMANDS[args.verb](args)
    except (UserError, run_folder.DiskFull, distributed.PeerLost) as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return (
            EXIT_DISK_FULL if isinstance(exc, run_folder.DiskFull) else 2 if isinstance(exc, UserError) else 1
        )
    except BudgetExceeded as exc:
        err_console.print(
            f"[bold red]over budget (measured):[/bold red] {escape(str(exc))}; stopped before training. "
            "--force trains anyway."
        )
        return EXIT_OVER_BUDGET
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
