"""The trainer callbacks: progress lines, checkpoint seals, the log file, signals, the watchdog.

Imported by training.py only; Unsloth comes first, as in every module that imports transformers.
"""

from __future__ import annotations

import finetune.train.stack  # noqa: F401  (first: Unsloth, set up, before the libraries it patches)

# isort: split
import json
import signal
import time
from pathlib import Path

import torch
from transformers import ProgressCallback, TrainerCallback

from finetune.base import distributed
from finetune.base.files import write_json
from finetune.base.internals import progress_bar
from finetune.plan.trackers import TRACKERS_FILE
from finetune.recipe.schema import TrainSection
from finetune.runs.run_folder import redact, seal_checkpoint, write_run_json
from finetune.train.watch import Watch


class StepTimer(TrainerCallback):
    """Each optimizer step's wall time, and where training began (a resume's step and tokens, read
    at train begin: after the trainer restored its state from the checkpoint)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0
        self.first_step = self.first_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step, self.first_tokens = state.global_step, state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels, not just their launch
        self.seconds.append(time.perf_counter() - self._start)


class LossProgress(ProgressCallback):
    """transformers' progress bar, printing one readable line per logging step instead of a dict;
    on a terminal only (stack.PROGRESS_BARS): elsewhere the step lines alone are the progress."""

    def __init__(self, bars: bool):
        super().__init__()
        self.bars = bars

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        bar = progress_bar(self)
        write = bar.write if bar is not None else lambda line: print(line, flush=True)
        if "eval_loss" in logs:
            write(f"step {state.global_step:>5}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}")
        if "loss" not in logs:
            return
        line = f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}"
        if "learning_rate" in logs:
            line += f"  lr {logs['learning_rate']:.3e}"
        if "grad_norm" in logs:
            line += f"  grad_norm {logs['grad_norm']:.3f}"
        write(line)


TRAINING_DTYPES = "finetune-dtypes.json"  # in each checkpoint: the dtype each trainable weight had


class SealCheckpoints(TrainerCallback):
    """Seal each checkpoint once the trainer has written all of it (see run.seal_checkpoint), with
    the dtypes the trainable weights had (see RestoreTrainingDtypes)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        # Under torchrun every rank writes its random state into the checkpoint: all must be done.
        distributed.barrier()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            dtypes = {
                n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad
            }
            write_json(checkpoint / TRAINING_DTYPES, dtypes)
            seal_checkpoint(checkpoint)


class RestoreTrainingDtypes(TrainerCallback):
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


class LogFile(TrainerCallback):
    """Every log entry appended to log.jsonl as it happens, so a run that dies keeps its log."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:  # every rank logs the same, gathered figures
            with self.path.open("a") as file:
                file.write(redact(json.dumps({**logs, "step": state.global_step})) + "\n")


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current optimizer step, save a checkpoint, stop cleanly.
    A second Ctrl-C stops at once (KeyboardInterrupt); a second SIGTERM changes nothing."""

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
            # Only a person's second Ctrl-C means "now". A SIGTERM that comes again (the kernel's
            # parent-death signal under torchrun, a scheduler that repeats itself) must not cut the
            # checkpoint the first one asked for; what cannot wait sends SIGKILL.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: saving a checkpoint after this step (Ctrl-C again to stop at once)",
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        # Under torchrun each rank gets the signal on its own: they agree, to stop at the same step.
        if distributed.any_rank(self.signal_name is not None):
            self.signal_name = self.signal_name or "a signal to another rank"
            control.should_save = True
            control.should_training_stop = True


class Watchdog(TrainerCallback):
    """Stops a diverging run before it saves a bad checkpoint; warns of loss spikes (finetune.train.watch)."""

    def __init__(self, train_settings: TrainSection):
        self.watch = Watch(
            train_settings.divergence_patience,
            train_settings.grad_norm_limit,
            running_scales=not train_settings.grpo(),
        )
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


class RecordTrackerIds(TrainerCallback):
    """Writes RUN/trackers.json with the tracker runs this run logs to, once transformers' own
    callbacks (added before this one, so called first) have started them: a resume continues the
    MLflow run by its id (trackers.tracker_environment), and the report can name both."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ids = {}
        if "mlflow" in args.report_to:
            import mlflow

            run = mlflow.active_run()
            if run is not None:
                ids.update(mlflow_run_id=run.info.run_id, mlflow_tracking_uri=mlflow.get_tracking_uri())
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                ids.update(wandb_run_id=wandb.run.id, wandb_project=wandb.run.project)
        if ids:
            write_run_json(self.run_dir / TRACKERS_FILE, ids)


class DropUnmeasured(TrainerCallback):
    """Leaves out of a step's log what was not measured: TRL's GRPO logs None for a clip ratio's
    minimum or maximum when no token was clipped, which trackers refuse with a warning a step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in [key for key, value in (logs or {}).items() if value is None]:
            del logs[key]


def tracker_callbacks(report_to: list[str], run_dir: Path) -> list[TrainerCallback]:
    """Ours beside the trackers transformers runs itself (SFTConfig's report_to): TensorBoard's
    writer, since transformers 5 takes its folder only from an environment variable (a writer of
    our own puts the events in the run folder without changing the process's environment), and
    the record of the tracker runs' ids."""
    callbacks: list[TrainerCallback] = [RecordTrackerIds(run_dir)]
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.insert(0, TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return [DropUnmeasured(), *callbacks]
