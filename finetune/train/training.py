"""Training: load the model, add LoRA, build the trainer, train, save.

Unsloth patches transformers, TRL and PEFT when it is imported, so every module that imports them
(this one, callbacks.py, inference.py) imports unsloth first; the CLI imports this one lazily, after
the recipe has been validated and the run planned (plan/job.py).
"""

from __future__ import annotations

from finetune.train import stack  # first: the backend (Unsloth, set up, before the libraries it patches)

# isort: split
import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from transformers import EarlyStoppingCallback, ProgressCallback, Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from finetune.base import distributed
from finetune.base.errors import UserError
from finetune.base.internals import cpu_map_location, keep_4bit_layout, save_checkpoint_now
from finetune.data.store import cache_files_elsewhere, prepared_data, run_fingerprints
from finetune.data.tokenize import resolve_chat_template
from finetune.models.base import base_model
from finetune.models.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from finetune.plan import schedule, trackers
from finetune.plan.engine import engine_for
from finetune.recipe.schema import Recipe, TrainSection
from finetune.runs.outcome import BestCheckpoint, Measured, OutOfMemory, TrainResult
from finetune.runs.run_folder import (
    disk_full_as,
    keep_log_until,
    manifest,
    save_adapter,
    start_adapter,
    write_run_file,
    write_run_json,
)
from finetune.train.callbacks import (
    LogFile,
    LossProgress,
    RestoreTrainingDtypes,
    SealCheckpoints,
    StepTimer,
    StopOnSignal,
    Watchdog,
    tracker_callbacks,
)
from finetune.train.gpu_memory import read_peak_memory, reset_peak_memory
from finetune.train.inference import generate_samples
from finetune.train.our_trainer import OurTrainer


def _timed_train(trainer: FinetuneTrainer, resume_from: Path | None = None) -> Measured:
    """Train with a step timer and fresh peak-memory counters, measured as bare_unsloth.py measures."""
    timer = StepTimer()
    trainer.add_callback(timer)
    reset_peak_memory()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.remove_callback(timer)
    return Measured(timer.seconds, *read_peak_memory(), timer.first_step, timer.first_tokens)


def model_path(recipe: Recipe) -> str:
    """What to hand to from_pretrained: the tiny model's cache folder, a local folder, or a hub id."""
    if recipe.model.name != TINY_MODEL_NAME:
        return recipe.model.name
    with distributed.main_first():  # rank 0 builds it: under torchrun transformers saves no weights elsewhere
        return str(ensure_tiny_model())


def load_model(recipe: Recipe):
    """The base model (4-bit when the recipe says so) and its tokenizer, on the recipe's backend."""
    model = recipe.model
    loaded, tokenizer = stack.load_model(
        model_path(recipe), model.max_seq_length, model.load_in_4bit, model.dtype
    )
    keep_4bit_layout(loaded)  # the samples before training must not change the weights it sees
    return loaded, tokenizer


def add_lora(model, recipe: Recipe):
    """Wrap the model with trainable LoRA adapters, new or (model.adapter) a finished run's; the
    base weights stay frozen."""
    model = stack.add_lora(
        model,
        recipe.lora,
        engine_for(recipe, torch.cuda.is_available()).checkpointing,
        recipe.train.seed,
        recipe.model.max_seq_length,
    )
    start = start_adapter(recipe)
    if start is not None:  # its weights into the new adapter, of the same shape (start_adapter checked)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(model, load_file(str(start / "adapter_model.safetensors")))
        unmatched = [k for k in loaded.unexpected_keys if "lora_" in k]
        if unmatched:
            raise UserError(
                f"model.adapter: {start} holds weights this model has no place for ({unmatched[0]})"
            )
    return model


def build_sft_config(recipe: Recipe, output_dir: Path, save: bool = True) -> SFTConfig:
    """Map the recipe onto SFTConfig, setting every field we rely on (library defaults move).
    ``save``: checkpoints, into ``output_dir``."""
    engine = engine_for(recipe, torch.cuda.is_available())  # what the plan decided, to the letter
    return SFTConfig(
        **training_arguments(recipe, output_dir, save),
        max_length=recipe.model.max_seq_length,
        packing=engine.packing,
        # Always passed: Unsloth enables padding-free batching on some GPUs when this is unset.
        padding_free=engine.padding_free,
        packing_strategy="bfd",  # the strategy data.tokenize.count_packed_sequences counts for
        dataset_num_proc=1,
        include_num_input_tokens_seen="non_padding",  # trained tokens per second, for the report
    )


def training_arguments(recipe: Recipe, output_dir: Path, save: bool) -> dict:
    """The TrainingArguments every method's config shares (SFT's here, preference tuning's in
    train/preference.py)."""
    train = recipe.train
    engine = engine_for(recipe, torch.cuda.is_available())
    best = save and train.keeps_best()
    warmup = train.warmup_steps if train.warmup_steps is not None else (train.warmup_ratio or 0.0)
    return dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        # Our own schedules (see FinetuneTrainer) never reach get_scheduler; this passes validation.
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
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        # A float below 1 is a share of the total steps for transformers: every 10% by default; at
        # every evaluation when the best checkpoint is kept (the schema allows no other steps then).
        save_steps=train.save_steps or (train.eval_steps if best else 0.1),
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        # The eval loss is all an evaluation reports: without this the trainer gathers every eval
        # batch's T x V logits on the GPU until the evaluation ends, the usual "validation fails OOM".
        prediction_loss_only=True,
        # transformers ranks each evaluation, keeps the best checkpoint out of save_total_limit's
        # rotation and loads it at the end; a resume restores the early-stopping counter with it.
        load_best_model_at_end=best,
        metric_for_best_model=train.best_metric() if best else None,
        greater_is_better=bool(train.greater_is_better) if best else None,
        restore_callback_states_from_checkpoint=best,
        # Trackers but TensorBoard (build_trainer adds ours); the run reports, never the probe.
        report_to=trackers.transformers_report_to(recipe.output.report_to, training=save),
        run_name=output_dir.parent.name,  # the run folder's name, in W&B, MLflow and trackio
        project=output_dir.parent.parent.name,  # the recipe's name (trackio's project)
        logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop the run), not averaged away
        gradient_checkpointing=engine.checkpointing != "off",  # TRL's default (on) would undo 'off'
        disable_tqdm=False,
        **stack.trainer_settings(train.optim, engine.optimizer, recipe.model.dtype),  # optimizer, precision
    )


class FinetuneTrainer(OurTrainer, SFTTrainer):
    """TRL's SFTTrainer with OurTrainer's additions."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if stack.BACKEND == "transformers" and not torch.cuda.is_available():
            # TRL's fused LM head is a Triton (GPU-only) kernel; on the CPU, transformers' own loss
            # over the logits, averaged over the accumulated tokens just the same.
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error, or cuBLAS failing to allocate its workspace (a RuntimeError)."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in text or "out of memory" in text)
    )


def _release(trainer: FinetuneTrainer | None = None) -> None:
    """Free what a trainer held (optimizer state first: Unsloth's trainer keeps itself alive through a
    reference cycle) and the allocator's cached blocks."""
    if trainer is not None:
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _out_of_memory(trainer: FinetuneTrainer) -> OutOfMemory:
    """What ran out, and a sealed checkpoint of the last completed step where one is sound (it ran out
    in the forward or backward pass, which changes no weight) and needs no other process (torchrun's)."""
    peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    step = trainer.state.global_step
    oom = OutOfMemory(step + 1, trainer.batch_tokens, peak)
    distributed.tell_out_of_memory(step + 1)
    if trainer.in_evaluation:  # step's update is whole; the last checkpoint is the one to trust
        oom = OutOfMemory(step, trainer.batch_tokens, peak, evaluating=True)
        oom.unsaved = "an evaluation changes no weight, so the last checkpoint is what to start from"
    elif step == 0:
        oom.unsaved = "no step had finished"
    elif not trainer.in_forward_backward:
        oom.unsaved = "it ran out outside the forward and backward pass, where weights may be half updated"
    elif distributed.active():  # the others wait in this step's collectives: saving would wait with them
        oom.unsaved = "under torchrun a checkpoint needs every process, and the others are mid-step"
    else:
        _release()  # room to write from
        save_checkpoint_now(trainer)
        checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        SealCheckpoints().on_save(trainer.args, trainer.state, trainer.control, model=trainer.model)
        oom.checkpoint = checkpoint if checkpoint.is_dir() else None
    return oom


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
    for_probe: bool = False,
) -> FinetuneTrainer:
    """The trainer over prepared examples; with packing, TRL packs them best-fit-decreasing into
    max_seq_length sequences, and attention stays within each example (position ids restart)."""
    trainer_class, rows, extra = FinetuneTrainer, _trainer_rows, {}
    if recipe.train.preference():  # DPO, KTO, ORPO or SimPO: TRL's trainer of the method
        from finetune.train import preference

        trainer_class, rows = preference.TRAINERS[recipe.train.method_name()], preference.trainer_rows
        args = preference.build_config(recipe, training_arguments(recipe, output_dir, save))
    elif recipe.train.grpo():  # sampled completions, rewarded (the task's tests, run confined)
        from finetune.data.store import chat_prompts
        from finetune.train import grpo

        trainer_class, rows = grpo.FinetuneGRPOTrainer, grpo.trainer_rows
        args = grpo.build_config(recipe, training_arguments(recipe, output_dir, save), worst_case=for_probe)
        extra = {"reward_funcs": grpo.reward_functions(recipe, chat_prompts(recipe, tokenizer.chat_template))}
    else:
        args = build_sft_config(recipe, output_dir, save)
    if os.environ.get("FINETUNE_INJECT_FAULT"):  # the tests' faults, loaded only when asked for
        from finetune.train.faults import with_faults

        trainer_class = with_faults(trainer_class, for_probe)
    with cache_files_elsewhere():
        trainer = trainer_class(
            model=model,
            processing_class=tokenizer,
            train_dataset=rows(dataset),
            eval_dataset=rows(eval_dataset),
            args=args,
            train_settings=recipe.train,
            **extra,
        )
    if save:
        trainer.add_callback(SealCheckpoints())
        if recipe.train.early_stopping_patience is not None:
            trainer.add_callback(
                EarlyStoppingCallback(
                    recipe.train.early_stopping_patience, recipe.train.early_stopping_threshold or 0.0
                )
            )
        for callback in tracker_callbacks(recipe.output.report_to, output_dir.parent):
            trainer.add_callback(callback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress(stack.PROGRESS_BARS))
    return trainer


def _worst_eval_rows(evaluation: Dataset, lengths: list[int], batch: int, seq: int, packing: bool):
    """The eval rows of the largest eval batch the plan counts (plan/budget.py): the ``batch``
    longest, or with packing as many of the longest as fill ``batch`` sequences; and its tokens."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True)
    if packing:
        chosen, total = [], 0
        for k in order:
            if total >= batch * seq:
                break
            chosen.append(k)
            total += min(lengths[k], seq)
        tokens = batch * seq
    else:
        chosen = order[:batch]
        tokens = len(chosen) * min(max(lengths[k] for k in chosen), seq)
    with cache_files_elsewhere():
        return evaluation.select(chosen), tokens


class ProbeEvaluation(TrainerCallback):
    """The probe's peak memory split in two: its training steps', read at the end of its last step,
    and its evaluation's, which transformers runs right after that step (the counters are reset in
    between), in the state a run's evaluations see: mid-train(), the optimizer's state held."""

    def __init__(self, last_step: int):
        self.last_step = last_step
        self.train_peaks: tuple[int | None, int | None] = (None, None)
        self.eval_peak: int | None = None
        self.evaluated = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last_step:
            self.train_peaks = read_peak_memory()
            reset_peak_memory()

    def on_evaluate(self, args, state, control, **kwargs):
        self.eval_peak, self.evaluated = read_peak_memory()[1], True


def probe(
    model,
    tokenizer,
    recipe: Recipe,
    dataset: Dataset,
    lengths: list[int],
    run_dir: Path,
    steps: int = 3,
    evaluation: tuple[Dataset, list[int]] | None = None,
) -> Measured:
    """A few real optimizer steps on the worst case, every micro-batch made of the longest rows of
    ``dataset`` (whose token ``lengths`` are given), then, when the run evaluates, one eval batch
    of the longest rows of ``evaluation`` (its dataset and lengths); then the LoRA weights are put
    back: the run starts as if the probe had not happened."""
    batch = recipe.train.per_device_train_batch_size
    longest = sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True)[:batch]
    with cache_files_elsewhere():
        probe_rows = dataset.select(longest * (recipe.train.gradient_accumulation_steps * steps))
    eval_rows = eval_tokens = None
    if evaluation is not None and recipe.train.eval_steps is not None and evaluation[1]:
        packing = engine_for(recipe, torch.cuda.is_available()).packing
        eval_rows, eval_tokens = _worst_eval_rows(
            *evaluation, recipe.train.per_device_eval_batch_size, recipe.model.max_seq_length, packing
        )
    train_settings = recipe.train.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": 0,
            "warmup_ratio": None,
            "lr_scheduler_type": "constant",
            **dict.fromkeys(("min_lr", "min_lr_rate", "power", "decay_ratio", "step_size", "gamma")),
            "eval_steps": steps if eval_rows is not None else None,  # once, after the last step
            "save_steps": None,
            "logging_steps": steps,
            **dict.fromkeys(
                ("load_best_model_at_end", "early_stopping_patience", "early_stopping_threshold")
            ),
            **dict.fromkeys(("metric_for_best_model", "greater_is_better")),
        }
    )
    probe_recipe = recipe.model_copy(update={"train": train_settings})
    # On the host: a copy on the GPU would count in the peak the probe measures.
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    trainer = build_trainer(
        model, tokenizer, probe_rows, probe_recipe, run_dir / "probe", eval_dataset=eval_rows, for_probe=True
    )
    trainer.remove_callback(LossProgress)
    evaluated = ProbeEvaluation(steps)
    if eval_rows is not None:
        trainer.add_callback(evaluated)
    failed = None
    try:
        measured = _timed_train(trainer)
        if evaluated.evaluated:  # the training steps' peak, and the evaluation's apart
            measured.peak_allocated, measured.peak_reserved = evaluated.train_peaks
            measured.eval_tokens, measured.eval_peak_reserved = eval_tokens, evaluated.eval_peak
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
        failed = OutOfMemory(
            None,
            trainer.batch_tokens,
            peak,
            unsaved="nothing was trained yet",
            evaluating=trainer.in_evaluation,
        )
    # Outside the except block: its traceback no longer holds the failed step's tensors.
    _release(trainer)
    del trainer
    if "ref" in getattr(model, "peft_config", {}):  # DPO's and KTO's reference copy: the run adds its own
        model.delete_adapter("ref")
    _release()
    if failed is not None:
        raise failed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    return measured


def train(
    recipe: Recipe,
    run_dir: Path,
    check_probe: Callable[[Measured], None] | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Load, add LoRA, optionally probe (``check_probe`` raises to stop the run), train, and save the
    adapter and tokenizer into ``run_dir/adapter``. ``checkpoint``: continue ``run_dir`` from this
    checkpoint of it (runs/resume.py's resume_point chose it and checked the inputs)."""
    resume = checkpoint is not None
    model, tokenizer = load_model(recipe)
    model = add_lora(model, recipe)
    if recipe.data.chat_template:  # saved with the adapter, so inference renders as training did
        tokenizer.chat_template = resolve_chat_template(recipe.data.chat_template)
    with distributed.main_first():  # under torchrun, built once: rank 0 builds, the others open it
        store = prepared_data(recipe)
    samples_file = run_dir / "samples.json"
    if not resume and distributed.is_main():  # rank 0 alone writes the run folder
        # After loading: a hub model is in the cache now, with the revision the run trains.
        record = manifest(
            recipe, run_fingerprints(recipe), stack.device_record(model.dtype), base_model(recipe)
        )
        write_run_json(run_dir / "manifest.json", record)
        samples = generate_samples(
            model, tokenizer, store, recipe.output.samples, recipe.output.sample_tokens
        )
        write_run_json(samples_file, [{**s, "before": s.pop("completion")} for s in samples])
    dataset = store.dataset("train")
    if check_probe is not None:
        evaluation = (
            (store.dataset("eval"), store.summary["eval_lengths"]) if store.summary["eval_rows"] else None
        )
        check_probe(
            probe(model, tokenizer, recipe, dataset, store.summary["lengths"], run_dir, evaluation=evaluation)
        )
    stopped_early = checkpoint is not None and _stopped_early_at(checkpoint)
    trained = recipe
    if stopped_early:  # killed after its last checkpoint: no step is left, only the best to load
        finished_at = int(checkpoint.name.split("-")[-1])
        trained = recipe.model_copy(
            update={"train": recipe.train.model_copy(update={"max_steps": finished_at})}
        )
    trainer = build_trainer(
        model, tokenizer, dataset, trained, run_dir / "checkpoints", store.dataset("eval"), save=True
    )
    log_file = run_dir / "log.jsonl"
    if distributed.is_main():
        keep_log_until(log_file, int(checkpoint.name.split("-")[-1]) if checkpoint else 0)
    trainer.add_callback(LogFile(log_file))
    if checkpoint is not None:
        trainer.add_callback(RestoreTrainingDtypes(model, checkpoint))
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    watchdog = Watchdog(recipe.train)
    trainer.add_callback(watchdog)
    # transformers' tracker callbacks read their settings from the environment when training begins.
    tracking = trackers.run_environment(recipe.output.report_to, run_dir, Path(recipe.output.dir))
    start = time.perf_counter()
    ran_out = False
    try:
        cpu_job = distributed.active() and not torch.cuda.is_available()  # see internals.cpu_map_location
        with (
            stopper,
            disk_full_as("a checkpoint", run_dir / "checkpoints", run_dir),
            trackers.environment(tracking),
        ):
            with cpu_map_location() if cpu_job else contextlib.nullcontext():
                measured = _timed_train(trainer, resume_from=checkpoint)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if distributed.lost_a_peer(error):  # the peer that left may have run out of memory
            raise OutOfMemory.on_another_rank() or distributed.PeerLost(run_dir) from None
        if not is_out_of_memory(error):
            raise
        ran_out = True
    if recipe.train.grpo():  # the tests reward's pool of sandbox workers
        trainer.close_rewards()
    if ran_out:  # handled outside the except block, whose traceback holds the failed step's tensors
        raise _out_of_memory(trainer)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    adapter_dir = run_dir / "adapter"
    if distributed.is_main():
        write_run_file(log_file, "".join(json.dumps(entry) + "\n" for entry in history))
    finished = stopper.signal_name is None and watchdog.stopped is None
    best = _best_checkpoint(trainer, recipe.train, stopped_early) if finished else None
    if finished and distributed.is_main():
        if best is not None:  # said before the adapter: a finished run's adapter is its best then
            write_run_json(run_dir / "best.json", best.as_dict())
        save_adapter(model, tokenizer, adapter_dir, run_dir)  # the best checkpoint's, when kept
        before = json.loads(samples_file.read_text()) if samples_file.is_file() else []
        after = generate_samples(model, tokenizer, store, len(before), recipe.output.sample_tokens)
        write_run_json(
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
        best=best,
    )


def _stopped_early_at(checkpoint: Path) -> bool:
    """Whether early stopping had ended the run at this checkpoint (its saved patience counter is
    spent): transformers resets the stop when training begins, so a resume would train on."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback")
    saved = saved[0] if isinstance(saved, list) and saved else saved
    if not isinstance(saved, dict) or state["global_step"] >= state["max_steps"]:
        return False  # no early stopping, or the run had reached its last step anyway
    return saved["attributes"]["early_stopping_patience_counter"] >= saved["args"]["early_stopping_patience"]


def _best_checkpoint(
    trainer: FinetuneTrainer, train: TrainSection, stopped_early: bool
) -> BestCheckpoint | None:
    """The checkpoint transformers kept as the best and loaded at the end of train(), or None when
    the recipe keeps none (or no evaluation ran). ``stopped_early``: a resume found that early
    stopping had already ended the run."""
    state = trainer.state
    if not train.keeps_best() or state.best_model_checkpoint is None:
        return None
    stopper = next(
        (c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None
    )
    return BestCheckpoint(
        metric=train.best_metric(),
        value=float(state.best_metric),
        step=int(Path(state.best_model_checkpoint).name.split("-")[-1]),
        last_step=state.global_step,
        early_stopped=stopped_early
        or (
            stopper is not None
            and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
            and state.global_step < state.max_steps  # at the last step, max_steps ended it
        ),
        patience=train.early_stopping_patience,
        threshold=train.early_stopping_threshold or 0.0,
    )
