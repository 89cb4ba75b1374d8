"""The command line: `python runner.py [VERB] ...`; a bare recipe path means `train`.

Everything except `train` is light (no torch): recipes and data are checked, and a run that cannot
start here is refused, in about a second, with one sentence per problem and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from finetune import distributed, evaluate, export, gguf_export, launch, lineage, run
from finetune.arguments import json_schema, parse_args, torchrun_argv
from finetune.audit import audit_recipe
from finetune.calibration import BudgetExceeded, calibration_table
from finetune.console import console, err_console, print_lines, print_table, print_warnings, progress_bar
from finetune.plots import plot_lengths, plot_schedule
from finetune.preflight import check_can_start, detect_gpus, fits_a_cpu, training_device
from finetune.recipe import UserError, dump_recipe, load_recipe
from finetune.recipe_files import find_recipe, shipped_recipes
from finetune.schedule import describe_plan
from finetune.store import count_rows

EXIT_USER_ERROR = 2
EXIT_OVER_BUDGET = 3
EXIT_DIVERGED = 4
EXIT_DISK_FULL = 5
EXIT_INTERRUPTED = 130


def _print_refusal(job: launch.Launch) -> None:
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
    recipe = load_recipe(path, overrides)
    if not as_json:
        run.check_writable(png, "--png")
    if gpu is None and not detect_gpus() and not fits_a_cpu(recipe):
        # A plan for this CPU would describe a run the runner refuses; plan for the usual 24 GB card.
        gpu = "rtx-4090"
        err_console.print(
            "note: no GPU here and this model needs one: planned for an RTX 4090; --gpu NAME for another"
        )
    job = launch.plan_launch(
        recipe, str(path), device=training_device(gpu), full_length=full_length, world_size=gpus
    )
    if as_json:
        document = launch.plan_document(job, job.suggestions)
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
    recipe = load_recipe(path, overrides)
    gpus = check_can_start(recipe, str(path))
    print_warnings(evaluate.after_training(recipe, allow))
    job = launch.plan_launch(recipe, str(path))
    print_warnings(job.warnings)
    where = f"{gpus[0].name} ({gpus[0].memory_gib:.0f} GiB)" if gpus else "CPU"
    console.print(
        f"[bold]{job.name}[/bold] {recipe.version}: {recipe.model.name} on {where}, "
        f"{job.data.rows} conversations"
    )
    print_lines(*job.lines())
    if job.over_budget:
        _print_refusal(job)
        if not force:
            err_console.print("Nothing was loaded or trained; --force launches anyway.")
            return EXIT_OVER_BUDGET
        err_console.print("[yellow]warning:[/yellow] --force: launching although the budget check failed")
    run_dir = launch.new_run_folder(job, str(path), overrides)
    # By default the probe runs on a GPU, where memory is the limit that ends runs; not under
    # torchrun, where each process would judge its own steps and could disagree.
    probing = (bool(gpus) if probe is None else probe) and not distributed.active()
    return _train(job, run_dir, None, probing, force, allow)


def cmd_resume(run_dir: Path, force: bool, allow: bool) -> int:
    """Continue a run from its latest sound checkpoint, with the recipe it was started with."""
    run.check_started_run(run_dir)  # a clear error when this is not a run folder
    run.hold_run(run_dir)  # refused while another process still trains it
    recipe = load_recipe(run_dir / "recipe.yaml")
    check_can_start(recipe, str(run_dir))
    print_warnings(evaluate.after_training(recipe, allow))
    print_lines(f"resuming {run_dir}")
    # Changed inputs are refused here, before anything is prepared from them or torch is imported.
    checkpoint, lines = launch.resume_point(recipe, run_dir, force)
    print_lines(*lines)
    job = launch.plan_launch(recipe, str(run_dir), run_dir.parent.name)
    return _train(job, run_dir, checkpoint, False, force, allow)


def _train(
    job: launch.Launch, run_dir: Path, checkpoint: Path | None, probe: bool, force: bool, allow: bool
) -> int:
    """Train (or resume) and report how it ended: exit 0, or 3 (out of memory), 4 (diverged), 130."""
    try:
        result = launch.start_run(job, run_dir, checkpoint, probe, force, print_lines)
    except run.OutOfMemory as oom:
        lines = launch.out_of_memory_report(job, oom, run_dir)
        err_console.print(f"[bold red]error:[/bold red] {escape(lines[0])}")
        for line in lines[1:]:
            err_console.print(line, markup=False)
        return EXIT_OVER_BUDGET
    if not distributed.is_main():
        return 0  # rank 0 reports for the job
    lines = launch.finish_run(job, run_dir, result)
    if result.interrupted_by:
        err_console.print(
            f"[yellow]{result.interrupted_by}:[/yellow] stopped after step {result.steps} with a checkpoint; "
            f"continue with: python runner.py resume {escape(str(run_dir))}"
        )
        return EXIT_INTERRUPTED
    if result.diverged:
        kept, _ = run.latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved before it"
        err_console.print(
            f"[bold red]diverged:[/bold red] {escape(result.diverged)}; stopped, and no adapter was saved; "
            f"{escape(kept)}. A lower train.learning_rate or train.max_grad_norm usually helps."
        )
        return EXIT_DIVERGED
    print_lines(*lines)
    console.print(
        f"[bold green]Done:[/bold green] {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; adapter saved to {result.adapter_dir}"
    )
    if job.recipe.evaluate.humaneval and allow:
        return cmd_eval(run_dir, None, {}, [1, 10, 100], allow)
    return 0


def smoke_verb(*args) -> int:
    from finetune import smoke  # heavy when it trains

    return smoke.run_smoke(*args)


def cmd_calibration(folder: Path) -> int:
    """Predicted against measured, over every run under ``folder`` that saved a budget.json."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("**/budget.json"))]
    if not records:
        raise UserError(f"no run under '{folder}' has a budget.json yet; train a recipe first")
    return print_lines(*calibration_table(records))


def cmd_data(recipe_arg: str, overrides: list[str], show: int, png: Path) -> int:
    """The audit: what will be trained, row by row, before anything is."""
    from rich.text import Text

    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    run.check_writable(png, "--png")
    found = audit_recipe(recipe, show)
    print_lines(f"tokenizer: {found.tokenizer}", *found.audit.lines())
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


def cmd_validate(recipe_args: list[str]) -> int:
    failed = 0
    for arg in recipe_args:
        try:
            recipe = load_recipe(find_recipe(arg))
            rows, report = count_rows(recipe)
            for line in report:
                err_console.print(f"{escape(arg)}: {escape(line)}")
            print_warnings(launch.checked_plan(recipe, rows, arg)[1])
        except UserError as exc:
            failed += 1
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
            continue
        console.print(f"[green]ok[/green] {arg} ({recipe.version}, {rows} training rows)")
    return EXIT_USER_ERROR if failed else 0


def cmd_show(recipe_arg: str, overrides: list[str]) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    console.print(dump_recipe(recipe), end="", markup=False)
    batch, accumulation = recipe.train.per_device_train_batch_size, recipe.train.gradient_accumulation_steps
    effective = f"{batch * accumulation} sequences per optimizer step ({batch} x {accumulation} accumulation)"
    print_lines(f"# effective batch: {effective}")
    data = launch.training_data(recipe)
    plan, warnings = launch.checked_plan(recipe, data.sequences, str(path))
    print_warnings(warnings)
    print_lines(*(f"# {line}" for line in data.describe() + describe_plan(plan)))
    return 0


def cmd_list() -> int:
    recipes = [(path.stem, load_recipe(path)) for path in shipped_recipes()]
    print_table(("recipe", "version", "what it is for"), [(n, r.version, r.description) for n, r in recipes])
    return 0


def cmd_copy(source: str, destination: Path) -> int:
    lineage.copy_recipe(source, run.check_writable(destination, "copy destination"))
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
        run.check_writable(output, "--output").write_text(text)
    else:
        console.print(text, end="", markup=False)
    return 0


def cmd_export(run_dir: Path, out: Path | None, quant: str | None) -> int:
    if quant:  # GGUF for llama.cpp and Ollama: finetune/gguf_export.py
        gguf_export.export_gguf(run_dir, out or run_dir / "gguf", quant, print_lines)
        return 0
    out = out or run_dir / "merged"
    recipe, _ = run.finished_adapter(run_dir)  # clear errors before the heavy import
    base = export.merge_base(recipe)
    export.check_room(recipe, base, out)  # before the folder is made: a refusal leaves nothing
    run.check_export_folder(out)
    print_lines(f"export: {base.why}")
    inference = launch.inference_stack(recipe)  # heavy: the run's backend, torch, transformers
    with run.export_folder(out, run_dir, "the merged model") as staging:
        inference.export(run_dir, staging, base)
    print_lines(f"merged 16-bit model saved to {out}")
    return 0


def cmd_eval(
    run_dir: Path | None, completions: Path | None, changes: dict, ks: list[int], allow: bool
) -> int:
    """A run's base model and adapter answering the tasks (evaluate.flags checked the flags), or a
    file of completions, scored."""
    if completions is not None:
        tasks = changes.get("tasks", evaluate.HUMANEVAL)
        return print_lines(*evaluate.score_completions(completions, tasks, allow, ks))
    with progress_bar("answering") as progress:
        lines = evaluate.evaluate_run(run_dir, allow, changes, ks, progress)
    return print_lines(*lines)


def cmd_torchrun(args) -> int:
    """`train --gpus N` and `resume --gpus N`: the same command, once per GPU, under torchrun."""
    source = args.recipe if args.verb == "train" else str(args.run_dir / "recipe.yaml")
    recipe = load_recipe(find_recipe(source), getattr(args, "overrides", []))
    return launch.torchrun(args.gpus, torchrun_argv(args), recipe, source)


def cmd_generate(run_dir: Path, prompt: str, max_new_tokens: int) -> int:
    recipe, _ = run.finished_adapter(run_dir)  # a clear error before the heavy import
    inference = launch.inference_stack(recipe)  # heavy: the run's backend, torch, transformers
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
    "eval": lambda a: cmd_eval(a.run_dir, a.completions, evaluate.flags(a), a.k, a.allow_code_execution),
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
        launch.join_job(args.verb)
        if not distributed.is_main():
            console.quiet = True  # rank 0 prints for the job
        return COMMANDS[args.verb](args)
    except (UserError, run.DiskFull, distributed.PeerLost) as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return EXIT_DISK_FULL if isinstance(exc, run.DiskFull) else 2 if isinstance(exc, UserError) else 1
    except BudgetExceeded as exc:
        err_console.print(
            f"[bold red]over budget (measured):[/bold red] {escape(str(exc))}; stopped before training. "
            "--force trains anyway."
        )
        return EXIT_OVER_BUDGET
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
