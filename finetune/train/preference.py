"""Preference tuning: TRL's DPO and KTO trainers (trl), ORPO and CPO (trl.experimental; SimPO is
CPO's loss_type simpo), each with OurTrainer's additions and fed the pairs data/preference.py
prepared, so the trainer trains exactly the tokens the audit showed and the plan counted.

TRL tokenizes preference rows itself; here the rows arrive tokenized (through our chat template,
truncated by our length policy), and each trainer is handed them in the form its own tokenizing
produces: DPO's and KTO's prompt_ids/chosen_ids/rejected_ids (completion_ids for KTO), ORPO's and
CPO's prompt_/chosen_/rejected_ input_ids, attention_mask and labels. The overridden methods are
private to TRL and pinned by tests/e2e/test_preference.py (experimental APIs move).

With LoRA there is no second model: DPO's and KTO's reference is the base with the adapter
switched off (TRL's use_adapter around the reference pass), ORPO and SimPO need none.
"""

from __future__ import annotations

from finetune.train import stack  # noqa: F401  (first: Unsloth before the libraries it patches)

# isort: split
import warnings

from datasets import Dataset

with warnings.catch_warnings():  # trl.experimental says it is experimental on import: we know
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from finetune.data.store import cache_files_elsewhere
from finetune.data.tokenize import IGNORE_INDEX
from finetune.recipe.schema import Recipe
from finetune.train.our_trainer import OurTrainer, TrainedAdapterOnly


def _pair_columns(dataset: Dataset) -> Dataset:
    """The stored pairs (the chosen conversation, the rejected answer, the prompt's length) as
    prompt_ids, chosen_ids and rejected_ids (KTO: completion_ids and label)."""

    def split(row):
        n = row["prompt_length"]
        out = {"prompt_ids": row["input_ids"][:n]}
        if row["label"] is None:
            out |= {"chosen_ids": row["input_ids"][n:], "rejected_ids": row["rejected_ids"]}
        else:
            out |= {"completion_ids": row["input_ids"][n:], "label": row["label"]}
        return out

    kto = dataset[0]["label"] is not None
    keep = ["prompt_ids", "completion_ids", "label"] if kto else ["prompt_ids", "chosen_ids", "rejected_ids"]
    with cache_files_elsewhere():
        mapped = dataset.map(split, desc="pairs")
    return mapped.select_columns(keep)


def trainer_rows(dataset: Dataset | None) -> Dataset | None:
    if dataset is None or not len(dataset):
        return None
    return _pair_columns(dataset)


def build_config(recipe: Recipe, arguments: dict):
    """The method's TRL config: the shared TrainingArguments, the sequence limit and the method's
    options, each set (library defaults move)."""
    method, options = recipe.train.method_name(), recipe.train.method_options()
    length = {"max_length": recipe.model.max_seq_length}
    if method == "dpo":
        return DPOConfig(
            **arguments,
            **length,
            beta=options["beta"],
            loss_type=[options["loss_type"]],
            label_smoothing=options["label_smoothing"],
            precompute_ref_log_probs=False,  # the reference pass runs beside each step, as planned
            padding_free=False,
            truncation_mode="keep_start",  # our length policy already cut each pair to fit
            dataset_num_proc=1,
            include_num_input_tokens_seen="non_padding",
        )
    if method == "kto":
        return KTOConfig(
            **arguments,
            **length,
            beta=options["beta"],
            loss_type=options["loss_type"],
            desirable_weight=options["desirable_weight"],
            undesirable_weight=options["undesirable_weight"],
            precompute_ref_log_probs=False,
            dataset_num_proc=1,
            include_num_input_tokens_seen="non_padding",  # the trained completions (not the KL ones)
        )
    common = dict(
        **length,
        max_completion_length=recipe.model.max_seq_length,
        beta=options["beta"],
        dataset_num_proc=1,
        remove_unused_columns=False,  # its collator reads columns the model's signature lacks
        is_encoder_decoder=False,
        generate_during_eval=False,
    )
    if method == "orpo":
        return ORPOConfig(**arguments, **common)
    return CPOConfig(
        **arguments,
        **common,
        loss_type="simpo",
        simpo_gamma=options["simpo_gamma"],
        cpo_alpha=options["cpo_alpha"],
        label_smoothing=options["label_smoothing"],
    )


class PreparedDPO(TrainedAdapterOnly, DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids, chosen_ids, rejected_ids: what TRL's own tokenizing returns


class PreparedKTO(TrainedAdapterOnly, KTOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # What TRL's own tokenizing returns after its tokenizing step: the KL completions are each
        # batch's completions shifted by one, mismatched with the prompts (TRL 1.15's add_kl_completion_ids).
        if not self.calculate_KL:
            return dataset

        def add_kl_completion_ids(examples):
            examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
            return examples

        return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)


def _tokenized_row(feature) -> dict:
    """ORPO's and CPO's tokenize_row output, from our tokens: prompt, then each answer after it
    with the prompt masked out of its labels."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = feature[f"{side}_ids"]
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return row


class _PreparedRows:
    """ORPO and CPO map tokenize_row over the rows in __init__; ours are tokenized already."""

    def tokenize_row(self, feature, model=None) -> dict:
        return _tokenized_row(feature)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ours = ["prompt_ids", "chosen_ids", "rejected_ids"]
        self.train_dataset = self.train_dataset.remove_columns(ours)
        if self.eval_dataset is not None:
            self.eval_dataset = self.eval_dataset.remove_columns(ours)


class PreparedORPO(_PreparedRows, ORPOTrainer):
    pass


class PreparedCPO(_PreparedRows, CPOTrainer):
    pass


class FinetuneDPOTrainer(OurTrainer, PreparedDPO):
    pass


class FinetuneKTOTrainer(OurTrainer, PreparedKTO):
    pass


class FinetuneORPOTrainer(OurTrainer, PreparedORPO):
    pass


class FinetuneSimPOTrainer(OurTrainer, PreparedCPO):
    pass


TRAINERS = {
    "dpo": FinetuneDPOTrainer,
    "kto": FinetuneKTOTrainer,
    "orpo": FinetuneORPOTrainer,
    "simpo": FinetuneSimPOTrainer,
}
