"""The command line: `python runner.py [VERB] ...`; a bare recipe path means `train`.

Everything except `train` is light (no torch): recipes and data are checked, and a run that cannot
start here is refused, in about a second, with one sentence per problem and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.audit import audit, trained_runs
from finetune.budget import (
    GIB,
    GPUS,
    BudgetExceeded,
    BudgetPlan,
    calibration_record,
    calibration_table,
    measured_verdicts,
)
from finetune.launch import budget_check, checked_plan, plan_document, training_data
from finetune.plots import plot_lengths, plot_schedule
from finetune.preflight import check_can_start, detect_gpus, fits_a_cpu, training_device
from finetune.recipe import (
    UNSET,
    Recipe,
    RecipeError,
    copy_recipe,
    diff_recipes,
    dump_recipe,
    field_reference,
    find_recipe,
    json_schema,
    load_recipe,
    parent_of,
    recipe_name,
    shipped_recipes,
)
from finetune.report import write_report
from finetune.run import (
    OutOfMemory,
    check_export_folder,
    check_writable,
    finished_adapter,
    latest_checkpoint,
    make_run_dir,
    read_run,
    write_atomic,
    write_json,
)
from finetune.schedule import SchedulePlan, describe_plan
from finetune.store import count_rows, data_tokenizer, open_store

# soft_wrap: never break a message or a path across lines, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 2
EXIT_OVER_BUDGET = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130
VERBS = (
    "train",
    "plan",
    "data",
    "validate",
    "show",
    "list",
    "copy",
    "diff",
    "resume",
    "export",
    "generate",
    "smoke",
    "calibration",
    "schema",
)

_OVERRIDES_HELP = "overrides section.key=value, e.g. train.learning_rate=1e-4 lora.r=32"


def _settings_help() -> str:
    lines = ["recipe settings (override any as section.key=value):"]
    lines += [f"  {key:<38} {description} [{default}]" for key, default, description in field_reference()]
    return "\n".join(lines)


def _recipe_verb(verbs, name: str, help: str) -> argparse.ArgumentParser:
    """A verb that takes a recipe and overrides, with every setting listed in its --help."""
    parser = verbs.add_parser(
        name, help=help, epilog=_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner.py",
        description="Fine-tune a language model with LoRA/QLoRA from a recipe YAML.",
        epilog="A bare recipe path trains it: python runner.py recipes/smoke.yaml train.max_steps=10",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = _recipe_verb(verbs, "train", "train a recipe (the default verb)")
    train.add_argument("--force", action="store_true", help="launch even when the budget check fails")
    train.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a few real steps on the longest micro-batch first, checked against the budget "
        "(default: on with a GPU)",
    )

    plan = _recipe_verb(
        verbs, "plan", "preview steps, LR schedule, memory and time against the budget (exit 3 when over)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON, with the LR of every step")
    plan.add_argument("--png", type=Path, default=Path("lr_schedule.png"), help="where to write the plot")
    plan.add_argument("--gpu", help=f"plan for this GPU instead of this machine's ({', '.join(GPUS)})")
    plan.add_argument(
        "--full-length", action="store_true", help="plan every micro-batch at max_seq_length tokens"
    )

    validate = verbs.add_parser("validate", help="check recipes and their data without training")
    validate.add_argument("recipes", nargs="+", help="recipe files or shipped names")

    _recipe_verb(verbs, "show", "print the resolved recipe and the numbers derived from it")

    verbs.add_parser("list", help="the shipped recipes with their purpose and version")

    copy = verbs.add_parser("copy", help="an editable copy of a recipe that records its parent")
    copy.add_argument("source", help="shipped recipe name (e.g. code-gen) or a recipe file")
    copy.add_argument("destination", type=Path, help="the new recipe file")

    diff = verbs.add_parser("diff", help="what a recipe changes relative to its parent, after resolution")
    diff.add_argument("recipe")

    data = _recipe_verb(
        verbs, "data", "audit the training data: lengths, trained tokens, EOS, duplicates, rendered examples"
    )
    data.add_argument("--show", type=int, default=2, help="render this many rows with trained tokens marked")
    data.add_argument(
        "--png", type=Path, default=Path("token_lengths.png"), help="where to write the histogram"
    )

    resume = verbs.add_parser("resume", help="continue a stopped run from its latest sound checkpoint")
    resume.add_argument("run_dir", type=Path, help="the run folder (runs/<recipe>/<timestamp>-<hash>)")
    resume.add_argument("--force", action="store_true", help="resume although the data or tokenizer changed")

    export = verbs.add_parser("export", help="merge a finished run's adapter into a 16-bit model")
    export.add_argument("run_dir", type=Path, help="the run folder")
    export.add_argument("--out", type=Path, help="where to save it (default: RUN_DIR/merged)")

    generate = verbs.add_parser("generate", help="stream a finished run's answer to a prompt")
    generate.add_argument("run_dir", type=Path, help="the run folder")
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens")

    smoke = verbs.add_parser(
        "smoke", help="train every shipped recipe on the tiny model and check it against stored bands"
    )
    smoke.add_argument("recipes", nargs="*", help="only these recipes (default: every shipped one)")
    smoke.add_argument("--update-bands", action="store_true", help="store these results as the bands")
    smoke.add_argument(
        "--json", type=Path, default=Path("smoke-result.json"), help="where to write the result"
    )
    smoke.add_argument("--output", type=Path, default=Path("runs/_smoke"), help="where the smoke runs go")
    smoke.add_argument("--bands", type=Path, help="the bands file (default: tests/smoke_bands.json)")

    calibration = verbs.add_parser(
        "calibration", help="predicted vs measured memory and step time of past runs"
    )
    calibration.add_argument("runs", nargs="?", type=Path, default=Path("runs"), help="folder of runs")

    schema = verbs.add_parser("schema", help="print the recipe JSON Schema (for editors)")
    schema.add_argument("--output", type=Path, help="write it to this file instead")
    return parser


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _print_refusal(source: str, ideas: list[str]) -> None:
    err_console.print(
        f"[bold red]over budget:[/bold red] {escape(source)} is predicted not to fit; "
        "changes that would help:"
    )
    for idea in ideas or ["none of the usual changes is enough; a larger GPU is needed"]:
        err_console.print(f"  {escape(idea)}")


def cmd_plan(
    recipe_arg: str, overrides: list[str], as_json: bool, png: Path, gpu: str | None, full_length: bool
) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    if not as_json:
        check_writable(png, "--png")
    data = training_data(recipe)
    plan, warnings = checked_plan(recipe, data.sequences, str(path))
    if not as_json:
        _warn(warnings)
    if gpu is None and not detect_gpus() and not fits_a_cpu(recipe):
        # A plan for this CPU would describe a run the runner refuses; plan for the usual 24 GB card.
        gpu = "rtx-4090"
        err_console.print(
            "note: no GPU here and this model needs one: planned for an RTX 4090; --gpu NAME for another"
        )
    device = training_device(gpu)
    budget, budget_lines, ideas = budget_check(recipe, data, plan, device, full_length)
    fails = budget is not None and not budget.ok
    if as_json:
        console.print(json.dumps(plan_document(data, plan, budget, ideas)), markup=False)
        return EXIT_OVER_BUDGET if fails else 0
    for line in data.describe() + describe_plan(plan) + budget_lines:
        console.print(line, markup=False)
    console.print(f"plot: {plot_schedule(plan, png)}", markup=False)
    if fails:
        _print_refusal(str(path), ideas)
        return EXIT_OVER_BUDGET
    return 0


def _probe_checker(recipe: Recipe, budget: BudgetPlan | None, total_steps: int, force: bool):
    """What the probe's measurement is held to; raises BudgetExceeded unless --force."""

    def check(measured) -> None:
        step = measured.median_step_seconds
        where = "the worst-case micro-batch"
        console.print(
            f"probe: {len(measured.step_seconds)} steps on {where}, {step:.2f} s per step"
            + (
                f", peak {measured.peak_reserved / 2**30:.2f} GiB reserved"
                if measured.peak_reserved is not None
                else ""
            ),
            markup=False,
        )
        if budget is None:
            return
        verdicts = measured_verdicts(recipe, budget, step, measured.peak_reserved, total_steps)
        for verdict in verdicts:
            console.print(verdict.line(), markup=False)
        failed = [v.line() for v in verdicts if not v.ok]
        if failed and not force:
            raise BudgetExceeded("; ".join(failed))
        if failed:
            err_console.print(
                "[yellow]warning:[/yellow] --force: training although the probe broke the budget"
            )

    return check


def cmd_train(recipe_arg: str, overrides: list[str], force: bool = False, probe: bool | None = None) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    gpus = check_can_start(recipe, str(path))
    data = training_data(recipe)
    plan, warnings = checked_plan(recipe, data.sequences, str(path))
    _warn(warnings)
    device = training_device()
    budget, budget_lines, ideas = budget_check(recipe, data, plan, device)
    where = f"{gpus[0].name} ({gpus[0].memory_gib:.0f} GiB)" if gpus else "CPU"
    name = recipe_name(path)
    console.print(
        f"[bold]{name}[/bold] {recipe.version}: {recipe.model.name} on {where}, {data.rows} conversations"
    )
    for line in data.describe() + describe_plan(plan) + budget_lines:
        console.print(line, markup=False)
    if budget is not None and not budget.ok:
        _print_refusal(str(path), ideas)
        if not force:
            err_console.print("Nothing was loaded or trained; --force launches anyway.")
            return EXIT_OVER_BUDGET
        err_console.print("[yellow]warning:[/yellow] --force: launching although the budget check failed")

    run_dir = make_run_dir(recipe, name)  # before the heavy import: an unusable output.dir fails fast
    from finetune import train  # heavy: unsloth, torch, transformers, trl

    write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
    # The resolved recipe already holds the overridden values; this records how they got there.
    write_json(run_dir / "run.json", {"recipe": str(path), "overrides": overrides, "version": recipe.version})
    write_json(run_dir / "plan.json", plan_document(data, plan, budget))
    plot_schedule(plan, run_dir / "lr_schedule.png")
    # By default the probe runs on a GPU, where memory is the limit that ends runs.
    probing = bool(gpus) if probe is None else probe
    checker = _probe_checker(recipe, budget, plan.total_steps, force) if probing else None
    try:
        result = train.train(recipe, run_dir, checker)
    except OutOfMemory as oom:
        return _report_out_of_memory(recipe, data, plan, device, budget, run_dir, oom)
    return _after_training(recipe, name, run_dir, plan, budget, result)


def _report_out_of_memory(recipe, data, plan, device, budget, run_dir: Path, oom: OutOfMemory) -> int:
    """What ran out, against what was predicted, and changes predicted to need a fifth less memory."""
    saved = f"saved {oom.checkpoint.name}" if oom.checkpoint else "no step had finished, nothing to save"
    peak = f"{oom.peak_bytes / GIB:.2f} GiB" if oom.peak_bytes is not None else "not measured on the CPU"
    lines = [f"out of memory at step {oom.step} ({oom.tokens} tokens in the micro-batch); {saved}"]
    lines.append(f"peak memory measured: {peak}")
    ideas: list[str] = []
    if budget is not None:
        lines.append(
            f"predicted: {budget.memory.total / GIB:.2f} GiB (upper {budget.memory.upper / GIB:.2f} GiB)"
        )
        tighter = recipe.budget.model_copy(update={"max_memory_gib": 0.8 * budget.memory.upper / GIB})
        _, _, ideas = budget_check(recipe.model_copy(update={"budget": tighter}), data, plan, device)
    for line in lines:
        err_console.print(f"[bold red]error:[/bold red] {escape(line)}" if line is lines[0] else escape(line))
    if ideas:
        err_console.print("changes predicted to need at least a fifth less memory:")
        for idea in ideas:
            err_console.print(f"  {escape(idea)}")
    if oom.checkpoint:
        err_console.print(
            f"after changing the recipe, start a new run; this one is in {escape(str(run_dir))}"
        )
    return EXIT_OVER_BUDGET


def cmd_resume(run_dir: Path, force: bool) -> int:
    """Continue a run from its latest sound checkpoint, with the recipe it was started with."""
    read_run(run_dir)  # a clear error when this is not a run folder
    recipe = load_recipe(run_dir / "recipe.yaml")
    check_can_start(recipe, str(run_dir))
    console.print(f"resuming {run_dir}", markup=False)

    from finetune import train  # heavy: unsloth, torch, transformers, trl

    # The inputs are compared with the run's manifest first (in train), so changed data is refused
    # before anything is prepared from it.
    try:
        result = train.train(recipe, run_dir, resume=True, force=force)
    except OutOfMemory as oom:
        data, device = training_data(recipe), training_device()
        plan, _ = checked_plan(recipe, data.sequences, str(run_dir))
        budget, _, _ = budget_check(recipe, data, plan, device)
        return _report_out_of_memory(recipe, data, plan, device, budget, run_dir, oom)
    plan, _ = checked_plan(recipe, training_data(recipe).sequences, str(run_dir))
    return _after_training(recipe, run_dir.parent.name, run_dir, plan, None, result)


def _after_training(recipe: Recipe, name: str, run_dir: Path, plan: SchedulePlan, budget, result) -> int:
    logged = [(e["step"], e["learning_rate"]) for e in result.log_history if "learning_rate" in e]
    plot_schedule(plan, run_dir / "lr_schedule.png", logged)
    if result.interrupted_by:
        err_console.print(
            f"[yellow]{result.interrupted_by}:[/yellow] stopped after step {result.steps} with a checkpoint; "
            f"continue with: python runner.py resume {escape(str(run_dir))}"
        )
        return EXIT_INTERRUPTED
    if result.diverged:
        checkpoint, _ = latest_checkpoint(run_dir)
        kept = (
            f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        )
        err_console.print(
            f"[bold red]diverged:[/bold red] {escape(result.diverged)}; stopped, and no adapter was saved; "
            f"{escape(kept)}. A lower train.learning_rate or train.max_grad_norm usually helps."
        )
        return EXIT_DIVERGED
    if budget is not None:
        record = calibration_record(budget, result.measured.as_dict(), recipe.model.name, name)
        write_json(run_dir / "budget.json", record)
        step = result.measured.median_step_seconds
        if step:
            console.print(
                f"step time: {step:.3f} s measured (median after warm-up), "
                f"{budget.time.step_seconds:.3f} s predicted ({record['step_error']:+.0%})",
                markup=False,
            )
    report, lines = write_report(run_dir, result.log_history, result.seconds, result.spikes)
    for line in lines:
        console.print(line, markup=False)
    console.print(f"report: {report}", markup=False)
    console.print(
        f"[bold green]Done:[/bold green] {result.steps} steps in {result.seconds:.1f} s, "
        f"loss {result.first_loss:.4f} -> {result.final_loss:.4f}; adapter saved to {result.adapter_dir}"
    )
    return 0


def cmd_smoke(names: list[str], update: bool, json_path: Path, output: Path, bands_file: Path | None) -> int:
    """Every shipped recipe (or the named ones) in smoke mode, checked against the stored bands."""
    from finetune import smoke

    paths = [find_recipe(name) for name in names] if names else shipped_recipes()
    if bands_file is not None and not bands_file.is_file() and not update:
        raise RecipeError(f"--bands '{bands_file}' does not exist; --update-bands writes it")
    bands_file = bands_file or smoke.BANDS_FILE
    # Both are written after minutes of training: a path that cannot be written fails now.
    check_writable(bands_file if update else json_path, "--bands" if update else "--json")
    check_writable(output, "--output", folder=True)
    bands = smoke.load_bands(bands_file)
    results = [smoke.measure_or_failure(path, output) for path in paths]
    if update:
        updated, changes = smoke.new_bands(results, bands)
        for line in changes or ["no band changes"]:
            console.print(line, markup=False)
        write_json(bands_file, updated)
        console.print(f"bands written to {bands_file}", markup=False)
        return 0
    checks = [c for figures in results for c in smoke.check(figures, bands)]
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("recipe", "check", "band", "measured", ""):
        table.add_column(column)
    for c in checks:
        table.add_row(
            c.recipe, c.name, c.expected, c.got, "[green]ok[/green]" if c.ok else "[bold red]FAIL[/bold red]"
        )
    console.print(table)
    failed = [c for c in checks if not c.ok]
    installed = smoke.versions()
    changed = smoke.drift(installed)
    if changed:
        console.print(f"versions differing from the pins: {', '.join(changed)}", markup=False)
    write_json(
        json_path,
        {
            "ok": not failed,
            "versions": installed,
            "differing_from_pins": changed,
            "results": results,
            "checks": [vars(c) for c in checks],
        },
    )
    console.print(
        f"{len(checks) - len(failed)} of {len(checks)} checks within their bands; result in {json_path}",
        markup=False,
    )
    return 1 if failed else 0


def cmd_calibration(folder: Path) -> int:
    """Predicted against measured, over every run under ``folder`` that saved a budget.json."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("**/budget.json"))]
    if not records:
        raise RecipeError(f"no run under '{folder}' has a budget.json yet; train a recipe first")
    for line in calibration_table(records):
        console.print(line, markup=False)
    return 0


def cmd_data(recipe_arg: str, overrides: list[str], show: int, png: Path) -> int:
    """The audit: what will be trained, row by row, before anything is."""
    from rich.text import Text

    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    check_writable(png, "--png")
    source = data_tokenizer(recipe)
    if source is None:
        raise RecipeError(f"{path}: no tokenizer for {recipe.model.name} on disk to audit the data with")
    store = open_store(recipe, source)
    summary = store.summary
    tokenizer = source.load()
    result = audit(store.examples(), summary["rows"], summary["report"], tokenizer.eos_id)
    console.print(f"tokenizer: {summary['tokenizer']}", markup=False)
    for line in result.lines():
        console.print(line, markup=False)
    console.print(
        f"histogram: {plot_lengths(summary['lengths'], recipe.model.max_seq_length, png)}", markup=False
    )
    # Trained tokens in bold green on a terminal; between [[ and ]] when piped or without colour.
    marks = ("", "") if console.is_terminal and not console.no_color else ("[[", "]]")
    for example in store.examples(limit=show):
        console.rule(f"{example.source}  (trained tokens {'highlighted' if not marks[0] else 'in [[ ]]'})")
        text = Text()
        for ids, trained in trained_runs(example):
            piece = tokenizer.tokenizer.decode(ids, skip_special_tokens=False)
            text.append(
                f"{marks[0]}{piece}{marks[1]}" if trained else piece, style="bold green" if trained else "dim"
            )
        console.print(text)
    untrained = summary["dropped_untrained"]
    if untrained:
        err_console.print(
            f"[bold red]error:[/bold red] {len(untrained)} rows would train no token "
            f"after truncation ({escape(', '.join(untrained[:3]))}); raise "
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
            _warn(checked_plan(recipe, rows, arg)[1])
        except RecipeError as exc:
            failed += 1
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
            continue
        console.print(f"[green]ok[/green] {arg} ({recipe.version}, {rows} training rows)")
    return EXIT_USER_ERROR if failed else 0


def cmd_show(recipe_arg: str, overrides: list[str]) -> int:
    path = find_recipe(recipe_arg)
    recipe = load_recipe(path, overrides)
    console.print(dump_recipe(recipe), end="", markup=False)
    train = recipe.train
    effective = train.per_device_train_batch_size * train.gradient_accumulation_steps
    console.print(
        f"# effective batch: {effective} sequences per optimizer step "
        f"({train.per_device_train_batch_size} x {train.gradient_accumulation_steps} accumulation)"
    )
    data = training_data(recipe)
    plan, warnings = checked_plan(recipe, data.sequences, str(path))
    _warn(warnings)
    for line in data.describe() + describe_plan(plan):
        console.print(f"# {line}", markup=False)
    return 0


def cmd_list() -> int:
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("recipe", "version", "what it is for"):
        table.add_column(column)
    for path in shipped_recipes():
        recipe = load_recipe(path)
        table.add_row(path.stem, recipe.version, recipe.description)
    console.print(table)
    return 0


def cmd_copy(source: str, destination: Path) -> int:
    copy_recipe(source, check_writable(destination, "copy destination"))
    console.print(f"Copied {source} to {destination}; edit it, then `python runner.py {destination}`")
    return 0


def cmd_diff(recipe_arg: str) -> int:
    path = find_recipe(recipe_arg)
    parent_path, parent, note = parent_of(path)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    changes = diff_recipes(parent, load_recipe(path))
    if not changes:
        console.print(f"{path} resolves to the same values as {parent_path}")
    for key, old, new in changes:
        old_text, new_text = (v if v is UNSET else json.dumps(v) for v in (old, new))
        console.print(f"{key}: {old_text} -> {new_text}", markup=False)
    return 0


def cmd_schema(output: Path | None) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        check_writable(output, "--output").write_text(text)
    else:
        console.print(text, end="", markup=False)
    return 0


def main(argv: list[str]) -> int:  # noqa: C901 (one branch per verb)
    if argv and argv[0] not in VERBS and not argv[0].startswith("-"):
        argv = ["train", *argv]
    parser = build_parser()
    # Overrides may come after options too (`plan r.yaml --gpu h100 lora.r=8`), which argparse's
    # positional list cannot take once an option has interrupted it.
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if "=" not in arg or arg.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.verb == "train":
            return cmd_train(args.recipe, args.overrides, args.force, args.probe)
        if args.verb == "plan":
            return cmd_plan(args.recipe, args.overrides, args.json, args.png, args.gpu, args.full_length)
        if args.verb == "validate":
            return cmd_validate(args.recipes)
        if args.verb == "show":
            return cmd_show(args.recipe, args.overrides)
        if args.verb == "list":
            return cmd_list()
        if args.verb == "copy":
            return cmd_copy(args.source, args.destination)
        if args.verb == "diff":
            return cmd_diff(args.recipe)
        if args.verb == "data":
            return cmd_data(args.recipe, args.overrides, args.show, args.png)
        if args.verb == "resume":
            return cmd_resume(args.run_dir, args.force)
        if args.verb == "export":
            out = args.out or args.run_dir / "merged"
            finished_adapter(args.run_dir)  # clear errors before the heavy import
            check_export_folder(out)
            from finetune import train  # heavy: unsloth, torch, transformers

            out = train.export(args.run_dir, out)
            console.print(f"merged 16-bit model saved to {out}", markup=False)
            return 0
        if args.verb == "generate":
            finished_adapter(args.run_dir)  # a clear error before the heavy import
            from finetune import train  # heavy: unsloth, torch, transformers

            train.generate_from_run(args.run_dir, args.prompt, args.max_new_tokens)
            return 0
        if args.verb == "smoke":
            return cmd_smoke(args.recipes, args.update_bands, args.json, args.output, args.bands)
        if args.verb == "calibration":
            return cmd_calibration(args.runs)
        return cmd_schema(args.output)
    except RecipeError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        return EXIT_USER_ERROR
    except BudgetExceeded as exc:
        err_console.print(
            f"[bold red]over budget (measured):[/bold red] {escape(str(exc))}; stopped before training. "
            "--force trains anyway."
        )
        return EXIT_OVER_BUDGET
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED
