"""What the training data will be, as far as planning needs it: rows, token lengths, drops, packing.

Read from the prepared-data store's summary (plain JSON: no `datasets` import); with no tokenizer
on disk the rows are only counted. Packing follows the engine's decision (plan/engine.py), so the
sequences planned are the ones the trainer iterates over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.base.errors import UserError
from finetune.data.audit import overlap_line
from finetune.data.contamination import contamination_line
from finetune.data.store import count_rows, data_tokenizer, open_store
from finetune.data.tokenize import count_packed_sequences
from finetune.plan.devices import detect_gpus
from finetune.plan.engine import PADDING_FREE, packing_runs
from finetune.recipe.schema import Recipe


@dataclass(frozen=True)
class DataPlan:
    """What the training data will be, as far as planning needs it."""

    rows: int  # training rows, after any held-out eval rows and mixing
    lengths: list[int] | None  # token length of every row that is trained on; None without a tokenizer
    report: list[str]  # rows skipped, held out, mixed, dropped or truncated, one line per kind
    tokenizer: str  # where the tokenizer came from, or why there is none
    packing: bool
    max_seq_length: int
    eval_rows: int = 0  # rows held out or read for evaluation
    eval_lengths: list[int] | None = None  # token length of every eval row kept; None when unknown
    eval_overlap: list[list[str]] = field(default_factory=list)  # [eval row, train row], the first 100
    eval_overlap_count: int = 0  # eval rows whose text is also a training row's
    humaneval: dict = field(default_factory=dict)  # rows holding HumanEval problems (store summary)
    tasks: bool = False  # GRPO's tasks: the lengths are prompts' (completions are sampled)

    def _sequences(self, lengths: list[int] | None, rows: int) -> int:
        if lengths is None:
            return rows
        return count_packed_sequences(lengths, self.max_seq_length) if self.packing else len(lengths)

    @property
    def sequences(self) -> int:
        """Sequences the trainer iterates over: rows kept, or the packed sequences made from them."""
        return self._sequences(self.lengths, self.rows)

    @property
    def eval_sequences(self) -> int:
        """Sequences an evaluation iterates over (TRL packs the eval rows as it packs training's)."""
        return self._sequences(self.eval_lengths, self.eval_rows)

    def describe(self) -> list[str]:
        if self.lengths is None:
            return [
                f"data: {self.rows} rows; token lengths unknown ({self.tokenizer}), rows counted as sequences"
            ]
        ordered = sorted(self.lengths)
        median = ordered[len(ordered) // 2] if ordered else 0
        line = f"data: {self.rows} rows, {len(self.lengths)} trained"
        if self.tasks:
            line = f"data: {self.rows} tasks, {len(self.lengths)} kept"
            if ordered:
                line += f", prompts of {ordered[0]}-{ordered[-1]} tokens (median {median})"
            return [line, *self.report]
        if ordered:
            line += f", {ordered[0]}-{ordered[-1]} tokens (median {median})"
        if self.packing and self.lengths:
            fill = sum(self.lengths) / (self.sequences * self.max_seq_length)
            line += (
                f"; packed into {self.sequences} sequences of {self.max_seq_length} tokens ({fill:.0%} full)"
            )
        elif not PADDING_FREE:
            line += "; padded micro-batches (padding-free batching off)"
        return [line, *self.describe_eval(), *self.report]

    def describe_eval(self) -> list[str]:
        if not self.eval_rows:
            return []
        if not self.eval_lengths:
            return [f"eval data: {self.eval_rows} rows; token lengths unknown"]
        ordered = sorted(self.eval_lengths)
        return [
            f"eval data: {self.eval_rows} rows, {len(ordered)} kept, {ordered[0]}-{ordered[-1]} tokens "
            f"(median {ordered[len(ordered) // 2]}), {sum(ordered):,} in all"
        ]


def plan_data(recipe: Recipe, on_gpu: bool = True) -> DataPlan:
    """Token lengths and row counts of the training data, from the store (a cached plan takes
    milliseconds and imports nothing heavy); rows are only counted when no tokenizer is on disk."""
    packing, off = packing_runs(recipe, on_gpu)
    notes = [off] if off else []
    source = data_tokenizer(recipe)
    if source is None:
        rows, report = count_rows(recipe)
        return DataPlan(
            rows=rows,
            lengths=None,
            report=report + notes,
            tokenizer=f"no tokenizer for {recipe.model.name} on disk",
            packing=packing,
            max_seq_length=recipe.model.max_seq_length,
        )
    summary = open_store(recipe, source).summary
    return DataPlan(
        rows=summary["rows"],
        lengths=summary["lengths"],
        report=summary["report"] + notes,
        tokenizer=summary["tokenizer"],
        packing=packing,
        max_seq_length=recipe.model.max_seq_length,
        eval_rows=summary["eval_rows"],
        eval_lengths=summary["eval_lengths"],
        eval_overlap=summary["eval_overlap"],
        eval_overlap_count=summary["eval_overlap_count"],
        humaneval=summary["humaneval"],
        tasks=recipe.train.grpo(),
    )


def check_overlap(recipe: Recipe, data: DataPlan, source: str) -> str | None:
    """Refuse eval rows that are training rows too, unless data.eval_overlap allows them (then the
    warning to print)."""
    line = overlap_line(data.eval_overlap, data.eval_overlap_count)
    if line is None:
        return None
    if recipe.data.eval_overlap != "allow":
        raise UserError(
            f"{source}: {line}; their eval loss would reward memorising them: remove them from the eval "
            "data (or the duplicates from the training data), or set data.eval_overlap: allow"
        )
    return f"{source}: {line} (data.eval_overlap: allow)"


def check_held_out(recipe: Recipe, data: DataPlan, source: str) -> None:
    """GRPO refuses tasks that hold a HumanEval problem: its reward would train on that problem's
    own tests, and the HumanEval pass@1 reported after training would measure them. (SFT rows get
    the plan's warning below instead.)"""
    found = data.humaneval
    if recipe.train.grpo() and found.get("train_count"):
        line = contamination_line(found["train"], found["train_count"])
        raise UserError(
            f"{source}: {line}; GRPO would be rewarded by those problems' own tests and HumanEval must stay "
            "held out: remove them from the tasks"
        )


def contamination_warnings(data: DataPlan, source: str) -> list[str]:
    """The plan's warnings of training and eval rows that hold HumanEval problems."""
    found = data.humaneval
    lines = [
        contamination_line(found.get(what, []), found.get(f"{what}_count", 0), label)
        for what, label in (("train", "training"), ("eval", "eval"))
    ]
    return [f"{source}: {line}" for line in lines if line]


def training_data(recipe: Recipe) -> DataPlan:
    """What the trainer will make of the training rows (token lengths, drops, packing), from the
    prepared-data store (built now if these inputs were never prepared)."""
    return plan_data(recipe, on_gpu=bool(detect_gpus()))


def data_as_dict(data: DataPlan) -> dict:
    return {
        "rows": data.rows,
        "trained_rows": None if data.lengths is None else len(data.lengths),
        "sequences": data.sequences,
        "packing": data.packing,
        "padding_free": PADDING_FREE,
        "tokenizer": data.tokenizer,
        "token_lengths": data.lengths,
        "report": data.report,
        "eval_rows": data.eval_rows,
        "eval_token_lengths": data.eval_lengths,
        "humaneval": data.humaneval or None,  # None: not checked (no tokenizer, so no store)
    }
