"""Training: the only module that imports unsloth, torch, transformers, trl, peft and datasets.

Unsloth patches transformers, TRL and PEFT when it is imported, so it must be imported before them;
keeping every heavy import in this one module (imported lazily by the CLI after the recipe has been
validated) makes that order hold everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import unsloth  # noqa: F401, I001  (must come first: it patches the libraries below)
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.tensorboard import SummaryWriter
from transformers import ProgressCallback, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.optimization import get_wsd_schedule
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

from finetune import schedule
from finetune.prepare import IGNORE_INDEX, Example, resolve_chat_template
from finetune.recipe import Recipe, RecipeError, TrainSection, dump_recipe
from finetune.run import (
    OutOfMemory,
    check_export_folder,
    fingerprint_changes,
    finished_adapter,
    latest_checkpoint,
    manifest,
    read_run,
    redact,
    seal_checkpoint,
    write_atomic,
    write_json,
)
from finetune.store import Store, data_fingerprints, data_tokenizer, open_store
from finetune.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from finetune.watch import Watch

_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_GRADIENT_CHECKPOINTING = {"unsloth": "unsloth", "standard": True, "off": False}


@dataclass
class Measured:
    """What a run (or a probe) really used: the numbers predictions are checked against."""

    step_seconds: list[float]  # wall time of every optimizer step
    peak_allocated: int | None  # bytes, PyTorch's CUDA allocator; None on the CPU
    peak_reserved: int | None

    @property
    def median_step_seconds(self) -> float | None:
        """Median after warm-up (the first two steps compile kernels and fill caches)."""
        steady = self.step_seconds[2:] or self.step_seconds
        return statistics.median(steady) if steady else None

    def as_dict(self) -> dict:
        return {
            "median_step_seconds": self.median_step_seconds,
            "step_seconds": self.step_seconds,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_reserved_bytes": self.peak_reserved,
        }


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    adapter_dir: Path
    log_history: list[dict]
    measured: Measured
    interrupted_by: str | None = None  # the signal that stopped the run early, after a checkpoint
    diverged: str | None = None  # why the watchdog stopped the run (finetune.watch)
    spikes: list[dict] = field(default_factory=list)  # loss spikes, warned of as they happened


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels, not just their launch
        self.seconds.append(time.perf_counter() - self._start)


def _measure(trainer: SFTTrainer, resume_from: Path | None = None) -> Measured:
    """Train with a step timer and fresh peak-memory counters."""
    timer = _StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.remove_callback(timer)
    if torch.cuda.is_available():
        return Measured(timer.seconds, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    return Measured(timer.seconds, None, None)


def model_path(recipe: Recipe) -> str:
    """What to hand to from_pretrained: the tiny model's cache folder, a local folder, or a hub id."""
    if recipe.model.name == TINY_MODEL_NAME:
        return str(ensure_tiny_model())
    return recipe.model.name


def load_model(recipe: Recipe):
    """The base model (4-bit when the recipe says so) and its tokenizer, through Unsloth."""
    return FastLanguageModel.from_pretrained(
        model_name=model_path(recipe),
        max_seq_length=recipe.model.max_seq_length,
        load_in_4bit=recipe.model.load_in_4bit,
        dtype=_DTYPES[recipe.model.dtype],
    )


def add_lora(model, recipe: Recipe):
    """Wrap the model with trainable LoRA adapters; the base weights stay frozen."""
    lora = recipe.lora
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
        use_gradient_checkpointing=_GRADIENT_CHECKPOINTING[recipe.model.gradient_checkpointing],
        random_state=recipe.train.seed,
        max_seq_length=recipe.model.max_seq_length,
    )


def build_sft_config(recipe: Recipe, output_dir: Path, save: bool = True) -> SFTConfig:
    """Map the recipe onto SFTConfig, setting every field we rely on (library defaults move).
    ``save``: checkpoints, into ``output_dir``."""
    train = recipe.train
    warmup = train.warmup_steps if train.warmup_steps is not None else (train.warmup_ratio or 0.0)
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        # Schedules we build ourselves (see _install_own_scheduler) never reach get_scheduler; the
        # placeholder keeps SFTConfig's validation happy.
        lr_scheduler_type="constant"
        if train.lr_scheduler_type in schedule.OWN_SCHEDULES
        else train.lr_scheduler_type,
        lr_scheduler_kwargs=schedule.scheduler_kwargs(train),
        # transformers 5 takes both warmup forms in warmup_steps: an int counts steps, a float < 1 is a ratio.
        warmup_steps=warmup,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps if train.max_steps is not None else -1,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        optim=train.optim,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        # A float below 1 is a share of the total steps for transformers: every 10% by default.
        save_steps=train.save_steps or 0.1,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        max_length=recipe.model.max_seq_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",  # the strategy prepare.count_packed_sequences counts for
        dataset_num_proc=1,
        report_to="none",  # TensorBoard is added by build_trainer, writing where we say
        logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop the run), not averaged away
        include_num_input_tokens_seen="non_padding",  # trained tokens per second, for the report
        disable_tqdm=False,
    )


class _LossProgress(ProgressCallback):
    """transformers' progress bar, printing one readable line per logging step instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        if "eval_loss" in logs:
            self.training_bar.write(
                f"step {state.global_step:>5}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}"
            )
        if "loss" not in logs:
            return
        line = f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
        if "learning_rate" in logs:
            line += f"  lr {logs['learning_rate']:.3e}"
        if "grad_norm" in logs:
            line += f"  grad_norm {logs['grad_norm']:.3f}"
        self.training_bar.write(line)


TRAINING_DTYPES = "finetune-dtypes.json"  # in each checkpoint: the dtype each trainable weight had


class _SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once the trainer has written all of it (see run.seal_checkpoint), with
    the dtypes the trainable weights had (see _RestoreTrainingDtypes)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            dtypes = {
                n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad
            }
            write_json(checkpoint / TRAINING_DTYPES, dtypes)
            seal_checkpoint(checkpoint)


class _RestoreTrainingDtypes(TrainerCallback):
    """Make a resumed run continue exactly where the checkpoint left it.

    Unsloth's CPU trainer trains the LoRA weights (and so the AdamW moments) in bf16, but a
    checkpoint stores them as fp32 and loading it leaves them fp32, and the model's top module in
    eval mode: the resumed run would compute every later step slightly differently. Before the
    first resumed step, the weights and their optimizer state get back the dtypes they had.
    """

    def __init__(self, model, checkpoint: Path):
        self.model = model
        path = checkpoint / TRAINING_DTYPES
        self.dtypes = json.loads(path.read_text()) if path.is_file() else {}
        self.done = False

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.done:
            return
        self.done = True
        self.model.train()
        for name, param in self.model.named_parameters():
            dtype = getattr(torch, self.dtypes.get(name, ""), None)
            if dtype is None or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            moments = optimizer.state.get(param, {}) if optimizer is not None else {}
            for key, value in moments.items():
                if torch.is_floating_point(value) and value.shape == param.shape:
                    moments[key] = value.to(dtype)


class _LogFile(TrainerCallback):
    """Every log entry appended to log.jsonl as it happens, so a run that dies keeps its log."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            with self.path.open("a") as file:
                file.write(redact(json.dumps({**logs, "step": state.global_step})) + "\n")


class _StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current optimizer step, save a checkpoint, stop cleanly.
    A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: saving a checkpoint after this step (again to stop at once)", flush=True
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True


class _Watchdog(TrainerCallback):
    """Stops a diverging run before it saves a bad checkpoint; warns of loss spikes (finetune.watch)."""

    def __init__(self, train_settings: TrainSection):
        self.watch = Watch(train_settings.divergence_patience, train_settings.grad_norm_limit)
        self.stopped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        spikes = len(self.watch.spikes)
        reason = self.watch.observe(state.global_step, logs["loss"], logs.get("grad_norm"))
        for spike in self.watch.spikes[spikes:]:
            print(
                f"\nwarning: loss spike at step {spike['step']}: {spike['loss']:.4f}, "
                f"{spike['loss'] / spike['running_median']:.1f}x the running median",
                flush=True,
            )
        if self.watch.is_bad():
            control.should_save = False  # never checkpoint a state that may be the diverged one
        if reason is not None:
            self.stopped = reason
            control.should_training_stop = True


class _BatchTokens:
    """Wraps the trainer's training step: the token count of the micro-batch in flight (for the
    out-of-memory report), and the tests' injected faults."""

    def __init__(self, trainer: SFTTrainer):
        self.tokens: int | None = None
        inner = trainer.training_step
        fault = _injected_fault()

        def training_step(model, inputs, num_items_in_batch=None):
            self.tokens = int(inputs["input_ids"].numel())
            step = trainer.state.global_step + 1
            if fault == ("oom", step):
                raise torch.OutOfMemoryError(f"injected out-of-memory fault at step {step}")
            loss = inner(model, inputs, num_items_in_batch)
            if fault is not None and fault[0] == "nan" and step >= fault[1]:
                loss = loss * float("nan")
            return loss

        trainer.training_step = training_step


def _injected_fault() -> tuple[str, int] | None:
    """FINETUNE_INJECT_FAULT=oom@N or nan@N: the tests' way to make step N run out of memory or
    diverge, so the handling of both is exercised without a GPU or a bad recipe."""
    value = os.environ.get("FINETUNE_INJECT_FAULT", "")
    kind, _, step = value.partition("@")
    return (kind, int(step)) if kind in ("oom", "nan") and step.isdigit() else None


def _save_after_oom(trainer: SFTTrainer) -> Path | None:
    """A sealed checkpoint of the last completed step (the failed step changed no weight)."""
    if trainer.state.global_step == 0:
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # room to write from
    trainer._save_checkpoint(trainer.model, trial=None)
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    _SealCheckpoints().on_save(trainer.args, trainer.state, trainer.control, model=trainer.model)
    return checkpoint if checkpoint.is_dir() else None


def prepared_data(recipe: Recipe) -> Store:
    """The prepared rows: the store the plan read (see store.data_tokenizer)."""
    source = data_tokenizer(recipe)
    if source is None:
        raise RecipeError(f"model {recipe.model.name}: no tokenizer.json found to prepare the data with")
    return open_store(recipe, source)


def examples_dataset(examples: list[Example]) -> Dataset:
    """Examples held in memory as the trainer's dataset."""
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )


def _trainer_rows(dataset: Dataset | None) -> Dataset | None:
    # Finished input_ids and labels: TRL sees "input_ids" and skips its own tokenizing and masking.
    if dataset is None or not len(dataset):
        return None
    return dataset.select_columns(["input_ids", "labels"])


def build_trainer(
    model,
    tokenizer,
    dataset: Dataset,
    recipe: Recipe,
    output_dir: Path,
    eval_dataset: Dataset | None = None,
    save: bool = False,
) -> SFTTrainer:
    """SFTTrainer over prepared examples; with packing, TRL packs them best-fit-decreasing into
    max_seq_length sequences, and attention stays within each example (position ids restart)."""
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=_trainer_rows(dataset),
        eval_dataset=_trainer_rows(eval_dataset),
        args=build_sft_config(recipe, output_dir, save),
    )
    if save:
        trainer.add_callback(_SealCheckpoints())
        # transformers 5 takes TensorBoard's folder only from an environment variable; a writer of
        # our own puts the events in the run folder without changing the process's environment.
        trainer.add_callback(
            TensorBoardCallback(SummaryWriter(log_dir=str(output_dir.parent / "tensorboard")))
        )
    _install_own_scheduler(trainer, recipe.train)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_LossProgress())
    return trainer


def _install_own_scheduler(trainer: SFTTrainer, train: TrainSection) -> None:
    """Schedules that need the trainer's final step count (WSD's decay length) or that transformers
    lacks (step, exponential) are built here, when the trainer knows that count, from the same
    numbers the preview uses."""
    if train.lr_scheduler_type not in schedule.OWN_SCHEDULES:
        return
    library_create_scheduler = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:
            optimizer = optimizer or trainer.optimizer
            warmup = trainer.args.get_warmup_steps(num_training_steps)
            if train.lr_scheduler_type == "warmup_stable_decay":
                trainer.lr_scheduler = get_wsd_schedule(
                    optimizer,
                    num_warmup_steps=warmup,
                    num_decay_steps=schedule.count_decay_steps(train, num_training_steps),
                    num_training_steps=num_training_steps,
                    min_lr_ratio=schedule.floor_rate(train),
                )
            else:
                trainer.lr_scheduler = LambdaLR(
                    optimizer, lambda step: schedule.lr_factor(train, step, warmup, num_training_steps)
                )
            trainer._created_lr_scheduler = True  # so a second train() call rebuilds it, as transformers does
        # The library's own method then sees a scheduler and keeps it, adding Unsloth's resume fix-ups.
        return library_create_scheduler(num_training_steps, optimizer)

    trainer.create_scheduler = create_scheduler


def probe(
    model, tokenizer, recipe: Recipe, dataset: Dataset, lengths: list[int], run_dir: Path, steps: int = 3
) -> Measured:
    """A few real optimizer steps on the worst case, every micro-batch made of the longest rows of
    ``dataset`` (whose token ``lengths`` are given), then the LoRA weights are put back: the run
    starts as if the probe had not happened."""
    batch = recipe.train.per_device_train_batch_size
    longest = sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True)[:batch]
    probe_rows = dataset.select(longest * (recipe.train.gradient_accumulation_steps * steps))
    train_settings = recipe.train.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": 0,
            "warmup_ratio": None,
            "lr_scheduler_type": "constant",
            **dict.fromkeys(("min_lr", "min_lr_rate", "power", "decay_ratio", "step_size", "gamma")),
            "eval_steps": None,
            "save_steps": None,
            "logging_steps": steps,
        }
    )
    probe_recipe = recipe.model_copy(update={"train": train_settings})
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = build_trainer(model, tokenizer, probe_rows, probe_recipe, run_dir / "probe", save=False)
    trainer.remove_callback(_LossProgress)
    measured = _measure(trainer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return measured


def train(
    recipe: Recipe,
    run_dir: Path,
    check_probe: Callable[[Measured], None] | None = None,
    resume: bool = False,
    force: bool = False,
) -> TrainResult:
    """Load, add LoRA, optionally probe (``check_probe`` raises to stop the run), train, and save the
    adapter and tokenizer into ``run_dir/adapter``. ``resume``: continue ``run_dir`` from its
    latest sound checkpoint, refusing when the data or tokenizer changed since (unless ``force``)."""
    checkpoint = _checkpoint_to_resume(recipe, run_dir, force) if resume else None
    model, tokenizer = load_model(recipe)
    model = add_lora(model, recipe)
    if recipe.data.chat_template:  # saved with the adapter, so inference renders as training did
        tokenizer.chat_template = resolve_chat_template(recipe.data.chat_template)
    store = prepared_data(recipe)
    samples_file = run_dir / "samples.json"
    if not resume:
        write_json(run_dir / "manifest.json", manifest(recipe, run_fingerprints(recipe), _device()))
        samples = generate_samples(
            model, tokenizer, store, recipe.output.samples, recipe.output.sample_tokens
        )
        write_json(samples_file, [{**s, "before": s.pop("completion")} for s in samples])
    dataset = store.dataset("train")
    if check_probe is not None:
        check_probe(probe(model, tokenizer, recipe, dataset, store.summary["lengths"], run_dir))
    trainer = build_trainer(
        model, tokenizer, dataset, recipe, run_dir / "checkpoints", store.dataset("eval"), save=True
    )
    log_file = run_dir / "log.jsonl"
    _keep_log_until(log_file, int(checkpoint.name.split("-")[-1]) if checkpoint else 0)
    trainer.add_callback(_LogFile(log_file))
    if checkpoint is not None:
        trainer.add_callback(_RestoreTrainingDtypes(model, checkpoint))
    stopper = _StopOnSignal()
    trainer.add_callback(stopper)
    watchdog = _Watchdog(recipe.train)
    trainer.add_callback(watchdog)
    batch = _BatchTokens(trainer)
    start = time.perf_counter()
    try:
        with stopper:
            measured = _measure(trainer, resume_from=checkpoint)
    except torch.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        raise OutOfMemory(
            trainer.state.global_step + 1, batch.tokens, peak, _save_after_oom(trainer)
        ) from None
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    write_atomic(log_file, "".join(json.dumps(entry) + "\n" for entry in history))
    adapter_dir = run_dir / "adapter"
    if stopper.signal_name is None and watchdog.stopped is None:
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        before = json.loads(samples_file.read_text()) if samples_file.is_file() else []
        after = generate_samples(model, tokenizer, store, len(before), recipe.output.sample_tokens)
        write_json(
            samples_file, [{**b, "after": a["completion"]} for b, a in zip(before, after, strict=True)]
        )
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return TrainResult(
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        seconds=seconds,
        adapter_dir=adapter_dir,
        log_history=history,
        measured=measured,
        interrupted_by=stopper.signal_name,
        diverged=watchdog.stopped,
        spikes=watchdog.watch.spikes,
    )


def generate_samples(model, tokenizer, store: Store, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of the first ``count`` held-out prompts (training rows when there is no
    eval data): each prompt is its row up to the first trained token."""
    if count == 0:
        return []
    split = "eval" if store.dataset("eval") is not None else "train"
    samples = []
    FastLanguageModel.for_inference(model)
    # Generation must not move the random streams training draws from.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for example in store.examples(split, limit=count):
            first = next((k for k, label in enumerate(example.labels) if label != IGNORE_INDEX), 0)
            prompt = torch.tensor([example.input_ids[:first]], device=model.device)
            generated = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            samples.append(
                {
                    "source": example.source,
                    "prompt": tokenizer.decode(example.input_ids[:first]),
                    "completion": tokenizer.decode(generated[0][first:], skip_special_tokens=True),
                }
            )
    FastLanguageModel.for_training(model)
    return samples


def run_fingerprints(recipe: Recipe) -> dict:
    """What the run's inputs were, by content: checked again by a resume."""
    source = data_tokenizer(recipe)
    if source is None:
        raise RecipeError(f"model {recipe.model.name}: no tokenizer.json found to prepare the data with")
    recipe_digest = hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()[:16]
    return {"recipe": recipe_digest, **data_fingerprints(recipe, source)}


def _checkpoint_to_resume(recipe: Recipe, run_dir: Path, force: bool) -> Path:
    recorded = read_run(run_dir)["fingerprints"]
    changes = fingerprint_changes(recorded, run_fingerprints(recipe))
    if changes and not force:
        raise RecipeError(
            f"{run_dir}: the inputs changed since the run started, so resuming would not continue the "
            f"same run ({'; '.join(changes)}); --force resumes anyway"
        )
    for line in changes:
        print(f"warning: --force: resuming although {line}")
    checkpoint, skipped = latest_checkpoint(run_dir)
    for line in skipped:
        print(line)
    if checkpoint is None:
        raise RecipeError(f"{run_dir}: no complete checkpoint to resume from")
    print(f"resuming from {checkpoint.name}")
    return checkpoint


def _keep_log_until(log_file: Path, step: int) -> None:
    """A resumed run logs again from its checkpoint on: drop what was logged after it (and a last
    line a killed run may have left half-written)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line)
    write_atomic(log_file, "".join(line + "\n" for line in kept))


def _device() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    return {"type": "cpu", "threads": torch.get_num_threads()}


def load_adapter(adapter_dir: Path, max_seq_length: int = 2048, load_in_4bit: bool = True):
    """A trained adapter on its base model, ready for generation."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter_dir), max_seq_length=max_seq_length, load_in_4bit=load_in_4bit
    )
    FastLanguageModel.for_inference(model)
    return model, tokenizer


def export(run_dir: Path, out_dir: Path) -> Path:
    """The adapter merged into its base model, saved as 16-bit safetensors that plain transformers
    (or vLLM, llama.cpp's converter, ...) loads without this tool or Unsloth.

    On a GPU through Unsloth's merge of the 4-bit base, as the recipe trained it; on a CPU, where
    Unsloth cannot merge into 4-bit weights, into the base model loaded in 16-bit."""
    recipe, adapter = finished_adapter(run_dir)
    check_export_folder(out_dir)
    load_in_4bit = recipe.model.load_in_4bit and torch.cuda.is_available()
    model, tokenizer = load_adapter(adapter, recipe.model.max_seq_length, load_in_4bit)
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    return out_dir


def mean_loss(model, examples: list[Example]) -> float:
    """The model's mean loss over these rows' trained tokens, one row at a time."""
    losses = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids], device=model.device)
            labels = torch.tensor([example.labels], device=model.device)
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def generate_from_run(run_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Stream the trained model's answer to one user message (chat template, greedy) to stdout."""
    from transformers import TextStreamer

    recipe, adapter = finished_adapter(run_dir)
    model, tokenizer = load_adapter(adapter, recipe.model.max_seq_length, recipe.model.load_in_4bit)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(model, tokenizer, prompt, max_new_tokens, streamer)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, streamer=None) -> str:
    """Greedy completion of one user turn, rendered with the chat template (and streamed, given a
    transformers streamer)."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
