"""The command line's grammar: every verb, its arguments and their help (argparse), and the recipe's
reference as `--help` and the `schema` verb print it.

commands.py runs what this parses; keeping the declaration apart keeps each verb's behaviour short to read.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune.export.gguf_export import DEFAULT_QUANT, QUANTS
from finetune.plan.devices import GPUS
from finetune.recipe.schema import Recipe


def positive_int(text: str) -> int:
    """A count the user gives on the command line (--gpus, --k, --max-new-tokens): 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not '{text[:40]}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def count(text: str) -> int:
    """A count that may be 0 (--show)."""
    return 0 if text.strip() == "0" else positive_int(text)


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not '{text[:40]}'") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more and finite, not {text}")
    return value


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
    parser.add_argument(
        "--allow-unconfined-code",
        action="store_true",
        help="where the sandbox cannot be made (not root, no namespaces), run that code with resource "
        "limits only: it could then reach the network and read or write whatever this user can",
    )


def _gpus_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus", type=positive_int, help="train on N GPUs of this machine: the same command under torchrun"
    )


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The command line of a `--gpus N` train or resume, without --gpus, for each torchrun process."""
    if args.verb == "train":
        argv = ["train", args.recipe, *args.overrides]
        argv += [] if args.probe is None else ["--probe" if args.probe else "--no-probe"]
    else:
        argv = ["resume", str(args.run_dir)]
    argv += ["--force"] if args.force else []
    argv += ["--allow-code-execution"] if args.allow_code_execution else []
    return argv + (["--allow-unconfined-code"] if args.allow_unconfined_code else [])


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
    plan.add_argument(
        "--gpus", type=positive_int, help="plan for N GPUs training together (per GPU memory, time)"
    )

    validate = verbs.add_parser("validate", help="check recipes and their data without training")
    validate.add_argument(
        "recipes", nargs="+", help="recipe files or shipped names, and section.key=value overrides for each"
    )

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
    data.add_argument(
        "--show", type=count, default=2, help="render this many rows with trained tokens marked"
    )
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
    generate.add_argument("--max-new-tokens", type=positive_int, default=256, help="at most this many tokens")

    smoke = verbs.add_parser(
        "smoke", help="train every shipped recipe on the tiny model and check it against stored bands"
    )
    smoke.add_argument("recipes", nargs="*", help="only these recipes (default: every shipped one)")
    smoke.add_argument("--update-bands", action="store_true", help="store these results as the bands")
    smoke.add_argument(
        "--json", type=Path, default=Path("smoke-result.json"), help="where to write the result"
    )
    smoke.add_argument("--output", type=Path, default=Path("runs/_smoke"), help="where the smoke runs go")
    smoke.add_argument("--bands", type=Path, help="the bands file (default: finetune/cli/smoke_bands.json)")

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
    evaluate.add_argument(
        "--k", type=positive_int, nargs="+", default=[1, 10, 100], help="pass@k for these k"
    )
    for flag, kind, what in (
        ("--samples-per-task", positive_int, "answers per task (needs --temperature)"),
        ("--temperature", temperature, "sample at this temperature (default: greedy)"),
        ("--max-new-tokens", positive_int, "tokens per answer at most (default: 1024)"),
        ("--batch-size", positive_int, "answers generated at once (default: 16)"),
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
    # No prefix matching: `train --gpu h100` (copied from plan) must not become train's --gpus.
    for each in (parser, *verbs.choices.values()):
        each.allow_abbrev = False
    parser.verb_parsers = dict(verbs.choices)
    return parser


def _elsewhere(parser: argparse.ArgumentParser, verb: str, flag: str) -> str:
    """ "; --gpu is an option of plan" when another verb takes the option ``verb`` does not."""
    name = flag.split("=")[0]
    takes = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")  # in the verb's usage line
    others = [other for other, sub in parser.verb_parsers.items() if takes.search(sub.format_usage())]
    return (
        f"; {name} is an option of {' and '.join(others)}, not of {verb}"
        if others and verb not in others
        else ""
    )


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
        options = [arg for arg in stray if arg.startswith("-")]
        hint = _elsewhere(parser, args.verb, options[0]) if options else ""
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}{hint}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "allow_unconfined_code", False):  # the weaker consent includes the consent
        args.allow_code_execution = True
    return args
