"""The command line's grammar: every verb, its arguments and their help (argparse), and the recipe's
reference as `--help` and the `schema` verb print it.

cli.py runs what this parses; keeping the declaration apart keeps each verb's behaviour short to read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune.budget import GPUS
from finetune.gguf_export import DEFAULT_QUANT, QUANTS
from finetune.recipe import Recipe

_OVERRIDES_HELP = "overrides section.key=value, e.g. train.learning_rate=1e-4 lora.r=32"


def field_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every setting, in schema order: the --help text."""
    rows = []
    for section_name, section in Recipe.model_fields.items():
        annotation = section.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and section_name != "parent":
            for name, field in annotation.model_fields.items():
                default = (
                    "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
                )
                rows.append((f"{section_name}.{name}", default, field.description or ""))
    return rows


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema, for editors (yaml-language-server) and tooling."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Inherit every value from another recipe (a shipped name or a path); override here.",
    }
    schema["title"] = "finetune recipe"
    return schema


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


def _consent_flag(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument(
        "--allow-code-execution", action="store_true", help=f"confirm running model-written code{when}"
    )


def _gpus_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=int, help="train on N GPUs of this machine: the same command under torchrun"
    )


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The command line of a `--gpus N` train or resume, without --gpus, for each torchrun process."""
    if args.verb == "train":
        argv = ["train", args.recipe, *args.overrides]
        argv += [] if args.probe is None else ["--probe" if args.probe else "--no-probe"]
    else:
        argv = ["resume", str(args.run_dir)]
    argv += ["--force"] if args.force else []
    return argv + (["--allow-code-execution"] if args.allow_code_execution else [])


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
    _consent_flag(train, " (the recipe's evaluate.humaneval after training)")
    _gpus_flag(train)

    plan = _recipe_verb(
        verbs, "plan", "preview steps, LR schedule, memory and time against the budget (exit 3 when over)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON, with the LR of every step")
    plan.add_argument("--png", type=Path, default=Path("lr_schedule.png"), help="where to write the plot")
    plan.add_argument("--gpu", help=f"plan for this GPU instead of this machine's ({', '.join(GPUS)})")
    plan.add_argument(
        "--full-length", action="store_true", help="plan every micro-batch at max_seq_length tokens"
    )
    plan.add_argument("--gpus", type=int, help="plan for N GPUs training together (per GPU memory, time)")

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
    _consent_flag(resume, " (the recipe's evaluate.humaneval after training)")
    _gpus_flag(resume)

    export = verbs.add_parser(
        "export", help="merge a finished run's adapter into a 16-bit model, or a GGUF for llama.cpp/Ollama"
    )
    export.add_argument("run_dir", type=Path, help="the run folder")
    export.add_argument("--out", type=Path, help="where to save it (default: RUN_DIR/merged or RUN_DIR/gguf)")
    export.add_argument(
        "--format", choices=("safetensors", "gguf"), help="safetensors (default) or gguf, with a Modelfile"
    )
    export.add_argument(
        "--quant", help=f"GGUF quantization: {', '.join(QUANTS)} (default {DEFAULT_QUANT}; implies gguf)"
    )

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

    evaluate = verbs.add_parser(
        "eval",
        help="HumanEval pass@k of a run's base model and adapter, or of --completions FILE, by running "
        "the code confined",
    )
    evaluate.add_argument("run_dir", nargs="?", type=Path, help="a finished run folder")
    evaluate.add_argument(
        "--completions", type=Path, help="score these task_id/completion JSON lines instead"
    )
    evaluate.add_argument(
        "--tasks", help="'humaneval' or your own tasks file in HumanEval's format (default: the recipe's)"
    )
    evaluate.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="pass@k for these k")
    for flag, kind, what in (
        ("--samples-per-task", int, "answers per task (needs --temperature)"),
        ("--temperature", float, "sample at this temperature (default: greedy)"),
        ("--max-new-tokens", int, "tokens per answer at most (default: 1024)"),
        ("--batch-size", int, "answers generated at once (default: 16)"),
    ):
        evaluate.add_argument(flag, type=kind, help=f"{what}; the recipe's evaluate section otherwise")
    evaluate.add_argument(
        "--prompt", choices=("auto", "chat", "raw"), help="how the task is put to the model"
    )
    _consent_flag(evaluate, "")

    calibration = verbs.add_parser(
        "calibration", help="predicted vs measured memory and step time of past runs"
    )
    calibration.add_argument("runs", nargs="?", type=Path, default=Path("runs"), help="folder of runs")

    schema = verbs.add_parser("schema", help="print the recipe JSON Schema (for editors)")
    schema.add_argument("--output", type=Path, help="write it to this file instead")
    parser.set_defaults(verbs=tuple(verbs.choices))
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; a first argument that is no verb (a recipe path) means `train`."""
    parser = build_parser()
    if argv and argv[0] not in parser.get_default("verbs") and not argv[0].startswith("-"):
        argv = ["train", *argv]
    # Overrides may come after options too (`plan r.yaml --gpu h100 lora.r=8`), which argparse's
    # positional list cannot take once an option has interrupted it.
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if "=" not in arg or arg.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
