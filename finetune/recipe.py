"""The recipe: one typed schema, and loading a YAML file into it.

This module is the single source of truth for what a recipe may contain. Every section forbids
unknown keys, so a misspelled key is an error with a suggestion instead of a silently ignored
setting. Values that pass straight through to TRL/transformers keep their Hugging Face names, so a
user can paste them from a notebook. No torch here: a recipe is checked in well under a second.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class RecipeError(Exception):
    """A problem with the user's recipe; the message is meant to be shown as is, without a traceback."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        description="Hugging Face model id, a local folder, or 'tiny-llama-3' (built locally for smoke runs)."
    )
    load_in_4bit: bool = Field(True, description="Quantize the frozen base weights to 4-bit NF4 (QLoRA).")
    max_seq_length: Annotated[int, Field(gt=0, le=131072)] = Field(
        2048, description="Longest sequence in tokens; longer rows are truncated by the trainer."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; 'auto' picks bfloat16 where the GPU supports it, else float16."
    )
    backend: Literal["unsloth"] = Field("unsloth", description="Training backend.")
    gradient_checkpointing: Literal["unsloth", "standard", "off"] = Field(
        "unsloth",
        description="Recompute activations in the backward pass: 'unsloth' also offloads them to CPU memory.",
    )


class LoraSection(_Section):
    r: Annotated[int, Field(gt=0)] = Field(16, description="LoRA rank.")
    alpha: Annotated[int, Field(gt=0)] = Field(16, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers that get LoRA adapters.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA (scale = alpha / sqrt(r)).")


class DataSection(_Section):
    train: list[str] = Field(
        min_length=1, description="Training files (.jsonl/.json), relative to the working directory."
    )
    format: Literal["auto", "messages", "alpaca"] = Field(
        "auto",
        description="Row format: chat 'messages', or alpaca instruction/input/output; 'auto' detects it.",
    )
    train_on_responses_only: bool = Field(
        True, description="Compute the loss on assistant turns only (prompts are masked)."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_file_is_a_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("train"), str):
            values = {**values, "train": [values["train"]]}
        return values


SchedulerName = Literal["cosine", "linear", "constant", "constant_with_warmup"]
OptimizerName = Literal[
    "adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"
]


class TrainSection(_Section):
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(2e-4, description="Peak learning rate.")
    lr_scheduler_type: SchedulerName = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Optimizer steps of linear warmup from 0 to the peak LR."
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None, description="Warmup as a fraction of all optimizer steps (instead of warmup_steps)."
    )
    num_train_epochs: Annotated[float, Field(gt=0)] = Field(1.0, description="Passes over the training data.")
    max_steps: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Stop after this many optimizer steps (overrides num_train_epochs)."
    )
    per_device_train_batch_size: Annotated[int, Field(gt=0)] = Field(
        2, description="Sequences per micro-batch."
    )
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = Field(
        4, description="Micro-batches per optimizer step."
    )
    optim: OptimizerName = Field("adamw_8bit", description="Optimizer (transformers' names).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="Decoupled weight decay.")
    max_grad_norm: Annotated[float, Field(gt=0)] = Field(1.0, description="Gradient clipping norm.")
    seed: int = Field(3407, description="Seed for LoRA init, data order and dropout.")
    logging_steps: Annotated[int, Field(gt=0)] = Field(
        1, description="Print the loss every N optimizer steps."
    )
    save_steps: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Save a checkpoint every N optimizer steps; none when unset."
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainSection:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class OutputSection(_Section):
    dir: str = Field("runs", description="Runs are saved under DIR/<recipe name>/<timestamp>-<hash>/.")


class Recipe(_Section):
    schema_: Literal[1] = Field(alias="schema", description="Recipe format version (this program reads 1).")
    version: str = Field(
        pattern=r"^\d+\.\d+\.\d+$", description="The recipe's own version, MAJOR.MINOR.PATCH (e.g. 1.0.0)."
    )
    description: str = Field(min_length=1, description="One line: what this recipe is for.")
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``path`` (or of its deepest existing parent)."""
    line = None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(key)), None)
            key_node = next((k for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _allowed_keys(path: tuple[Any, ...]) -> list[str]:
    """Field names (as written in YAML) of the section that holds ``path``'s last key."""
    model: type[BaseModel] = Recipe
    for key in path[:-1]:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe_error(
    error: dict[str, Any], source: str, root: yaml.Node | None, overridden: set[tuple[str, ...]]
) -> str:
    path = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
    dotted = ".".join(str(p) for p in path) or "(top level)"
    set_by = next((keys for keys in overridden if tuple(map(str, path[: len(keys)])) == keys), None)
    line = _line_of(root, path)
    if set_by:
        where = f"--set {'.'.join(set_by)}"
    else:
        where = f"{source}:{line}" if line else source
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(path[-1]), _allowed_keys(path), n=1, cutoff=0.6)
        hint = (
            f"; did you mean '{close[0]}'?" if close else f"; allowed here: {', '.join(_allowed_keys(path))}"
        )
        return f"{where}: unknown key '{dotted}'{hint}"
    if error["type"] == "missing":
        return f"{where}: '{dotted}' is required ({_field_description(path)})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {dotted}: {message} (got {error.get('input')!r})"


def _field_description(path: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Recipe
    field = None
    for key in path:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == str(key)), None)
        if field is None:
            return ""
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    return field.description or "" if field else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``train.max_steps=10`` into (['train', 'max_steps'], 10); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=10)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value else None


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {'.'.join(keys)}: '{key}' is not a section")
    node[keys[-1]] = value


def validate_recipe(
    raw: Any,
    source: str = "<recipe>",
    root: yaml.Node | None = None,
    overridden: set[tuple[str, ...]] = frozenset(),
) -> Recipe:
    """Validate a parsed YAML mapping; every problem is reported together, each with where it came from."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections (model, data, train, ...)")
    schema = raw.get("schema")
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise RecipeError(
            f"{source}: recipe schema {schema} is newer than this program understands ({SCHEMA_VERSION}); "
            "update the program"
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe_error(e, source, root, overridden) for e in exc.errors()]
        raise RecipeError("\n".join(problems)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    overridden = set()
    if isinstance(raw, dict):
        for item in overrides:
            keys, value = parse_override(item)
            _apply_override(raw, keys, value)
            overridden.add(tuple(keys))
    return validate_recipe(raw, str(path), root, overridden)


def recipe_name(path: str | Path) -> str:
    """A recipe's name is its file name without the extension."""
    return Path(path).stem


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in) as YAML, as every run saves it."""
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
