"""What every method's trainer adds to TRL's: SFT's (train/training.py) and preference tuning's
(train/preference.py)."""

from __future__ import annotations

from finetune.train import stack  # noqa: F401  (first: Unsloth before the libraries it patches)

# isort: split
import functools
import json
import logging
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_wsd_schedule

from finetune.plan import schedule
from finetune.recipe.schema import TrainSection


class OurTrainer:
    """What every method's trainer adds to TRL's (Unsloth's, once unsloth is imported: the classes
    are defined after that import): the schedules transformers lacks or cannot size
    (schedule.OWN_SCHEDULES), built from the same numbers the preview uses; the token count of the
    micro-batch in flight and whether it is in the forward and backward pass or an evaluation, for
    the out-of-memory report (the tests' injected faults subclass them: faults.py); and the best
    checkpoint found again when a resumed run's folder was moved."""

    def __init__(self, *args, train_settings: TrainSection, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_settings = train_settings
        self.batch_tokens: int | None = None
        self.in_forward_backward = False  # where an out-of-memory error came from
        self.in_evaluation = False
        self.moved_best: str | None = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # transformers records the best checkpoint by its absolute path and, resuming, forgets it
        # (with a warning) when that path is gone: a run folder moved since (another disk, a copied
        # runs/ folder) would lose its best checkpoint, to the rotation of old checkpoints too. It
        # is found again under the same name in this run's checkpoints.
        self.moved_best = None
        if isinstance(resume_from_checkpoint, (str, Path)):
            saved = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())
            best = saved.get("best_model_checkpoint")
            here = Path(self.args.output_dir) / Path(best).name if best else None
            if here is not None and here.is_dir() and not Path(best).is_dir():
                self.moved_best = str(here)
        if self.moved_best is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        forgotten = _Without("recorded in the resumed state does not exist anymore")
        logging.getLogger("transformers.trainer").addFilter(forgotten)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            logging.getLogger("transformers.trainer").removeFilter(forgotten)

    def _load_callback_state(self):
        # Called right after transformers dropped the best checkpoint it could not find.
        if self.moved_best is not None and self.state.best_model_checkpoint is None:
            self.state.best_model_checkpoint = self.moved_best
        super()._load_callback_state()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        train = self.train_settings
        if self.lr_scheduler is None and train.lr_scheduler_type in schedule.OWN_SCHEDULES:
            optimizer = optimizer or self.optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            if train.lr_scheduler_type == "warmup_stable_decay":
                self.lr_scheduler = get_wsd_schedule(
                    optimizer,
                    num_warmup_steps=warmup,
                    num_decay_steps=schedule.count_decay_steps(train, num_training_steps),
                    num_training_steps=num_training_steps,
                    min_lr_ratio=schedule.floor_rate(train),
                )
            else:
                self.lr_scheduler = LambdaLR(
                    optimizer, lambda step: schedule.lr_factor(train, step, warmup, num_training_steps)
                )
        # The library's method sees a scheduler and keeps it, adding what its subclasses add (Unsloth:
        # resume fix-ups). Unlike one it built, ours is not rebuilt by a second train() call; each
        # trainer here trains once.
        return super().create_scheduler(num_training_steps, optimizer)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.batch_tokens = batch_tokens(inputs)  # an eval batch's, for the report
        self.in_evaluation = True
        output = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self.in_evaluation = False
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batch_tokens = batch_tokens(inputs)
        self.in_forward_backward = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.in_forward_backward = False
        return loss


class TrainedAdapterOnly:
    """DPOTrainer, KTOTrainer and (with beta > 0, on TRL's own class) GRPOTrainer add the frozen
    reference adapter "ref" beside the trained one, and PEFT saves every adapter: the reference in
    a ref/ folder of each checkpoint. transformers 5.17's resume then loads the adapters of the
    sub-folders alone, not the trained one at the top, and the resumed run starts again from the
    initial adapter. Checkpoints hold the trained adapter
    only; a resume rebuilds the reference as the first run did, from the adapter it starts from."""

    def _save(self, output_dir=None, state_dict=None):
        model = self.model
        # On a GPU Unsloth's get_peft_model sets its own save_pretrained on the model: kept as found.
        own = model.__dict__.get("save_pretrained")
        model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=["default"])
        try:
            super()._save(output_dir, state_dict)
        finally:
            if own is None:
                del model.save_pretrained  # the class's method again
            else:
                model.save_pretrained = own


class _Without(logging.Filter):
    """Drops the log records whose message holds ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def batch_tokens(inputs: dict | list) -> int | None:
    """The token positions of a micro-batch: its input_ids (SFT's, DPO's chosen and rejected
    stacked), or the sum of ORPO's and SimPO's chosen and rejected ones; None for GRPO's rows
    (prompts, whose completions are not generated yet)."""
    if not isinstance(inputs, dict):
        return None
    if "input_ids" in inputs:
        return int(inputs["input_ids"].numel())
    return sum(
        int(v.numel()) for k, v in inputs.items() if k.endswith("input_ids") and not k.startswith("prompt")
    )
