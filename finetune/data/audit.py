"""The data audit (`runner.py data RECIPE`): what will be trained, before anything is.

Pure Python over the prepared examples, read once: counts, the token-length distribution, the share of each
row that is trained, rows that train nothing or never show the model how to stop, and duplicates.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from finetune.data.contamination import contamination_line
from finetune.data.preference import pair_lines
from finetune.data.store import open_store, required_tokenizer
from finetune.data.tokenize import IGNORE_INDEX, Example
from finetune.recipe.schema import Recipe

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass(frozen=True)
class Audit:
    rows: int
    kept: int
    length_percentiles: dict[int, int]
    trained_fraction_percentiles: dict[int, float]
    trained_tokens: int
    total_tokens: int
    missing_eos: list[str]  # kept rows whose last trained token is not EOS
    duplicates: list[list[str]]  # groups of rows with identical tokens
    report: list[str]  # dropped / truncated rows, from preparation
    sampled: str | None = None  # GRPO: what is trained instead of stored tokens (the completions)

    def lines(self) -> list[str]:
        lengths = ", ".join(f"p{p} {v}" for p, v in self.length_percentiles.items())
        fractions = ", ".join(f"p{p} {v:.0%}" for p, v in self.trained_fraction_percentiles.items())
        if self.sampled is not None:  # tasks: prompts only, never trained
            return [
                f"tasks: {self.rows} read, {self.kept} kept",
                f"prompt tokens: {lengths}",
                self.sampled,
                *self.report,
            ]
        lines = [
            f"rows: {self.rows} read, {self.kept} kept",
            f"tokens per row: {lengths}",
            f"trained share per row: {fractions}; {self.trained_tokens} of {self.total_tokens} tokens "
            f"trained ({self.trained_tokens / max(1, self.total_tokens):.0%})",
            *self.report,
        ]
        if self.missing_eos:
            lines.append(
                f"{len(self.missing_eos)} rows never train the end-of-turn token, so the model does not "
                f"learn to stop after them ({_some(self.missing_eos)})"
            )
        if self.duplicates:
            extra = sum(len(group) - 1 for group in self.duplicates)
            lines.append(
                f"{extra} duplicate rows in {len(self.duplicates)} groups "
                f"({'; '.join(' = '.join(group[:3]) for group in self.duplicates[:3])})"
            )
        return lines


def overlap_line(pairs: list[list[str]], count: int) -> str | None:
    """What the plan and the audit say of eval rows that are also training rows ([eval row, train
    row] pairs, the first of ``count``), or None when there are none."""
    if not count:
        return None
    shown = [f"{eval_row} = {train_row}" for eval_row, train_row in pairs[:3]]
    more = count - len(shown)
    return (
        f"{count} eval row{'s are' if count != 1 else ' is'} also training rows (whitespace aside): "
        f"{', '.join(shown)}{f' and {more} more' if more else ''}"
    )


def _some(sources: list[str], n: int = 3) -> str:
    return ", ".join(sources[:n]) + (f" and {len(sources) - n} more" if len(sources) > n else "")


def percentile(sorted_values: list, p: int):
    """Nearest-rank percentile of an ascending list (p100 is the maximum)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def audit(examples: Iterable[Example], rows: int, report: list[str], eos_id: int) -> Audit:
    """The audit of the kept rows, read once (they may not fit in memory: only their lengths, trained
    shares and a digest each are kept); ``report`` says what preparation dropped or truncated."""
    lengths, fractions, missing_eos, trained = [], [], [], 0
    groups = defaultdict(list)
    for e in examples:
        lengths.append(len(e.input_ids))
        fractions.append(e.trained_tokens / len(e.input_ids))
        trained += e.trained_tokens
        if _last_trained(e) != eos_id:
            missing_eos.append(e.source)
        groups[hashlib.blake2b(array("l", e.input_ids).tobytes(), digest_size=16).digest()].append(e.source)
    lengths.sort()
    fractions.sort()
    return Audit(
        rows=rows,
        kept=len(lengths),
        length_percentiles={p: percentile(lengths, p) for p in PERCENTILES},
        trained_fraction_percentiles={p: percentile(fractions, p) for p in (0, 50, 100)},
        trained_tokens=trained,
        total_tokens=sum(lengths),
        missing_eos=missing_eos,
        duplicates=[group for group in groups.values() if len(group) > 1],
        report=report,
    )


def _last_trained(example: Example) -> int | None:
    return next((label for label in reversed(example.labels) if label != IGNORE_INDEX), None)


def trained_runs(example: Example) -> list[tuple[list[int], bool]]:
    """The example's tokens in runs of trained / not trained, for rendering with highlights."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


@dataclass(frozen=True)
class DataAudit:
    """What `runner.py data` shows: the audit of every prepared row, and a few rows rendered."""

    tokenizer: str
    audit: Audit
    lengths: list[int]
    untrained: list[str]  # rows that would train no token after truncation
    shown: list[tuple[str, list[tuple[str, bool]]]]  # (row, its text in trained / untrained pieces)
    evaluation: Audit | None = None  # the eval rows, audited as the training rows are
    overlap: str | None = None  # eval rows that are training rows too (plan/data_plan.overlap_line)
    contamination: list[str] = field(default_factory=list)  # rows holding HumanEval problems, or "none"

    def lines(self) -> list[str]:
        lines = [f"tokenizer: {self.tokenizer}", *self.audit.lines()]
        if self.evaluation is not None:
            lines += [f"eval {line}" for line in self.evaluation.lines()]
        return lines + ([self.overlap] if self.overlap else []) + self.contamination


def audit_recipe(recipe: Recipe, show: int) -> DataAudit:
    """Audit the recipe's training data as the trainer will see it (the prepared-data store)."""
    source = required_tokenizer(recipe)
    store = open_store(recipe, source)
    summary = store.summary
    tokenizer = source.load()
    result = audit(store.examples(), summary["rows"], summary["report"], tokenizer.eos_id)
    decode = tokenizer.tokenizer.decode
    shown = [
        (example.source, [(decode(ids, skip_special_tokens=False), t) for ids, t in trained_runs(example)])
        for example in store.examples(limit=show)
    ]
    pairs = []
    if recipe.train.preference():  # each chosen conversation above; the rejected answer after it
        rows = store.dataset("train").select(range(min(show, summary["rows"])))
        if recipe.train.method_name() == "kto":
            shown = [
                (f"{source} ({'desirable' if row['label'] else 'undesirable'})", pieces)
                for (source, pieces), row in zip(shown, rows, strict=True)
            ]
        else:
            shown = [
                (
                    source,
                    [
                        *pieces,
                        ("\n--- rejected answer ---\n", False),
                        (decode(row["rejected_ids"], skip_special_tokens=False), True),
                    ],
                )
                for (source, pieces), row in zip(shown, rows, strict=True)
            ]
        pairs = pair_lines(store.dataset("train"), recipe.train.method_name() == "kto")
    if recipe.train.grpo():
        options = recipe.train.method_options()
        result = replace(
            result,
            sampled=f"trained: {options['num_generations']} completions sampled per prompt, each up to "
            f"{options['max_completion_length']} tokens, scored by the rewards; no prompt token is trained",
        )
    evaluation = None
    if summary["eval_rows"]:
        evaluation = audit(store.examples("eval"), summary["eval_rows"], [], tokenizer.eos_id)
    overlap = overlap_line(summary["eval_overlap"], summary["eval_overlap_count"])
    found = summary["humaneval"]
    contamination = [
        line
        for what, label in (("train", "training"), ("eval", "eval"))
        if (line := contamination_line(found.get(what, []), found.get(f"{what}_count", 0), label))
    ] or [f"HumanEval: no row holds one of its problems ({found['rule']})"]
    return DataAudit(
        summary["tokenizer"],
        replace(result, report=result.report + pairs),
        summary["lengths"],
        summary["dropped_untrained"],
        shown,
        evaluation,
        overlap,
        contamination,
    )
