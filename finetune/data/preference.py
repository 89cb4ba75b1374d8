"""Preference rows (DPO, ORPO, SimPO: a prompt with a chosen and a rejected answer; KTO: a prompt
with one completion labelled desirable or not), read and tokenized as the trainer will see them.

The formats are TRL's: ``prompt``/``chosen``/``rejected`` as strings or message lists, conversational
``chosen``/``rejected`` message lists whose shared leading turns are the prompt, and KTO's
``prompt``/``completion``/``label``. A chat pair is rendered through the same chat template SFT
uses: the prompt with the generation prompt, each answer as the text the template adds after it,
tokenized apart (what inference does: the prompt is encoded, then the answer generated). A text
pair is BOS + prompt, and each answer + EOS, as SFT's prompt/completion rows.

Each kept pair is stored as the chosen conversation (``input_ids``/``labels``, only the answer
trained), so the audit and the samples read it like an SFT row, plus ``rejected_ids`` (the rejected
answer's tokens) and ``prompt_length``; a KTO row has ``label`` instead of a rejected answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.base.errors import UserError
from finetune.data.rows import checked_messages
from finetune.data.tokenize import IGNORE_INDEX

# What the length policy did with a pair (as tokenize.length_policy's statuses).
KEPT, TRUNCATED, TOO_LONG = "kept", "truncated", "too long"


@dataclass(frozen=True)
class Pair:
    """One preference row. Chat rows hold message lists, text rows strings; ``rejected`` is None
    for an unpaired (KTO) row, whose ``label`` says whether ``chosen`` (its completion) is desirable."""

    source: str
    prompt: list[dict[str, str]] | str
    chosen: list[dict[str, str]] | str
    rejected: list[dict[str, str]] | str | None = None
    label: bool | None = None

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    def conversation(self) -> tuple[list[dict] | None, list[tuple[str, bool]] | None]:
        """The chosen answer as an SFT row's (messages, segments): what the overlap and HumanEval
        checks read."""
        if self.chat:
            return [*self.prompt, *self.chosen], None
        return None, [(self.prompt, False), (self.chosen, True)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "label": self.label,
        }


def _messages(value: Any, key: str, where: str, answer: bool | None) -> list[dict[str, str]]:
    """A checked message list: an answer (``answer`` true: assistant turns), a prompt (false: not
    ending with the assistant), or a whole conversation (None)."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{key}' must be a non-empty string or list of messages")
    cleaned = checked_messages(value, where, key)
    for i, message in enumerate(cleaned):
        if answer and message["role"] != "assistant":
            role = message["role"]
            raise UserError(f"{where}: {key}[{i}] is a {role} turn; an answer is assistant turns only")
    if answer and not any(m["content"].strip() for m in cleaned):
        raise UserError(f"{where}: '{key}' is empty, so the pair compares nothing")
    if answer is False and cleaned[-1]["role"] == "assistant":
        raise UserError(f"{where}: 'prompt' ends with an assistant turn; the answer follows the prompt")
    return cleaned


def _answer(value: Any, key: str, where: str, chat: bool) -> list[dict[str, str]] | str:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: '{key}' is empty, so the pair compares nothing")
        return [{"role": "assistant", "content": value}] if chat else value
    return _messages(value, key, where, answer=True)


def _shared_prompt(chosen: Any, rejected: Any, where: str) -> tuple[list, list, list]:
    """Conversational chosen/rejected without a prompt: their shared leading turns are the prompt."""
    chosen = _messages(chosen, "chosen", where, answer=None) if isinstance(chosen, list) else chosen
    rejected = _messages(rejected, "rejected", where, answer=None) if isinstance(rejected, list) else rejected
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise UserError(
            f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations (message lists) "
            "that share their prompt turns"
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # After the shared turns each side must be its answer alone: assistant turns.
    differs = next(
        (
            k
            for k in range(shared, max(len(chosen), len(rejected)))
            if any(k < len(side) and side[k]["role"] != "assistant" for side in (chosen, rejected))
        ),
        None,
    )
    if shared == len(chosen) == len(rejected):
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer, so the pair prefers nothing")
    if shared == 0 or differs is not None:
        at = differs if differs is not None else 0
        raise UserError(
            f"{where}: 'chosen' and 'rejected' do not share a prompt: they differ at messages[{at}], "
            "before the answer; a pair answers one prompt"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def read_pair(row: dict[str, Any], where: str, paired: bool) -> Pair:
    """A preference row (``paired``) or a KTO row; a malformed one is one sentence with its place."""
    if not paired:
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise UserError(
                f"{where}: expected 'prompt', 'completion' and 'label' (an unpaired KTO row) but the row "
                f"has no {' or '.join(map(repr, missing))}"
            )
        if not isinstance(row["label"], bool):
            raise UserError(
                f"{where}: 'label' must be true (a desirable completion) or false (undesirable), "
                f"not {row['label']!r}"
            )
        chat = not isinstance(row["prompt"], str)
        prompt = _messages(row["prompt"], "prompt", where, answer=False) if chat else row["prompt"]
        return Pair(where, prompt, _answer(row["completion"], "completion", where, chat), label=row["label"])
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise UserError(
            f"{where}: expected 'prompt', 'chosen' and 'rejected' (a preference pair) but the row has no "
            f"{' or '.join(map(repr, missing))}"
        )
    if "prompt" not in row:
        prompt, chosen, rejected = _shared_prompt(row["chosen"], row["rejected"], where)
    else:
        chat = not (isinstance(row["prompt"], str) and isinstance(row["chosen"], str))
        if isinstance(row["prompt"], str):
            if not row["prompt"].strip():
                raise UserError(f"{where}: 'prompt' is empty")
            prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
        else:
            prompt = _messages(row["prompt"], "prompt", where, answer=False)
        if not chat and not isinstance(row["rejected"], str):
            raise UserError(f"{where}: 'rejected' must be a string, as 'chosen' is")
        chosen = _answer(row["chosen"], "chosen", where, chat)
        rejected = _answer(row["rejected"], "rejected", where, chat)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer, so the pair prefers nothing")
    return Pair(where, prompt, chosen, rejected)


def pair_from_dict(entry: dict[str, Any]) -> Pair:
    return Pair(entry["source"], entry["prompt"], entry["chosen"], entry["rejected"], entry["label"])


@dataclass(frozen=True)
class TokenizedPair:
    source: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    label: bool | None = None

    @property
    def length(self) -> int:
        """The padded length of the pair's sequences: the trainer pads chosen and rejected alike."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids or []))


def tokenize_pair(tokenizer, pair: Pair) -> TokenizedPair:
    """The prompt's and each answer's tokens (see the module's docstring)."""
    from jinja2.exceptions import TemplateError

    answers = [pair.chosen] + ([pair.rejected] if pair.rejected is not None else [])
    if pair.chat:
        try:
            prompt = tokenizer.render(pair.prompt, add_generation_prompt=True)
            whole = [tokenizer.render([*pair.prompt, *answer]) for answer in answers]
        except TemplateError as exc:
            raise UserError(f"{pair.source}: the chat template rejects this pair: {exc}") from None
        if not all(text.startswith(prompt) for text in whole):
            raise UserError(
                f"{pair.source}: the chat template does not render the prompt as the start of the "
                "conversation, so the answer cannot be told apart from it"
            )
        texts = [prompt, *(text[len(prompt) :] for text in whole)]
        ids = [e.ids for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]
        prompt_ids, answer_ids = ids[0], ids[1:]
    else:
        bos = tokenizer.special_tokens.get("bos_token")
        ids = [
            e.ids for e in tokenizer.tokenizer.encode_batch([pair.prompt, *answers], add_special_tokens=False)
        ]
        prompt_ids = ([tokenizer.tokenizer.token_to_id(bos)] if bos else []) + ids[0]
        answer_ids = [answer + [tokenizer.eos_id] for answer in ids[1:]]
    rejected = answer_ids[1] if len(answer_ids) > 1 else None
    return TokenizedPair(pair.source, prompt_ids, answer_ids[0], rejected, pair.label)


def too_long_pair(source: str, length: int, max_seq_length: int) -> UserError:
    return UserError(
        f"{source}: {length} tokens (the prompt and its longer answer), longer than max_seq_length "
        f"{max_seq_length}; raise model.max_seq_length, or set data.overlong: drop or truncate"
    )


def pair_length_policy(
    pair: TokenizedPair, max_seq_length: int, overlong: str
) -> tuple[TokenizedPair, str, str]:
    """The pair as trained, what happened to it (KEPT, TRUNCATED or TOO_LONG), and where a
    truncation cut: "prompt" (its start, keeping the turn the answer follows), "answer" (the end of
    the longer answers) or both. As TRL's preference trainers did with max_prompt_length: a prompt
    longer than half of max_seq_length keeps its last half; then the answers are cut to fit."""
    if pair.length <= max_seq_length:
        return pair, KEPT, ""
    if overlong == "error":
        raise too_long_pair(pair.source, pair.length, max_seq_length)
    if overlong == "drop":
        return pair, TOO_LONG, ""
    cut, prompt = [], pair.prompt_ids
    if len(prompt) > max_seq_length // 2:
        prompt, cut = prompt[-(max_seq_length // 2) :], ["prompt"]
    room = max_seq_length - len(prompt)
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids and pair.rejected_ids[:room]
    if len(chosen) < len(pair.chosen_ids) or (
        rejected is not None and len(rejected) < len(pair.rejected_ids)
    ):
        cut.append("answer")
    return TokenizedPair(pair.source, prompt, chosen, rejected, pair.label), TRUNCATED, "+".join(cut)


def tokenize_pair_batch(batch: dict, tokenizer, max_seq_length: int, overlong: str) -> dict:
    """datasets.map over raw preference rows (a JSON ``pair`` each): the chosen conversation as
    input_ids/labels, the rejected answer, the prompt's length, the label, and what happened."""
    import json

    out: dict[str, list] = {
        key: []
        for key in (
            "input_ids",
            "labels",
            "rejected_ids",
            "prompt_length",
            "label",
            "length",
            "status",
            "cut",
            "error",
            "trained",
        )
    }
    for text in batch["pair"]:
        pair = pair_from_dict(json.loads(text))
        try:
            tokenized = tokenize_pair(tokenizer, pair)
            # "error" for long pairs is raised by the parent, naming the first one in file order.
            kept, status, cut = pair_length_policy(
                tokenized, max_seq_length, "drop" if overlong == "error" else overlong
            )
            error = ""
        except UserError as exc:
            tokenized = kept = None
            status, cut, error = "error", "", str(exc)
        trained = status in (KEPT, TRUNCATED)
        out["input_ids"].append(kept.prompt_ids + kept.chosen_ids if trained else [])
        out["labels"].append([IGNORE_INDEX] * len(kept.prompt_ids) + kept.chosen_ids if trained else [])
        out["rejected_ids"].append((kept.rejected_ids or []) if trained else [])
        out["prompt_length"].append(len(kept.prompt_ids) if trained else 0)
        out["label"].append(pair.label)
        out["length"].append(tokenized.length if tokenized is not None else 0)
        out["status"].append(status)
        out["cut"].append(cut)
        out["error"].append(error)
        out["trained"].append(len(kept.chosen_ids) + len(kept.rejected_ids or []) if trained else 0)
    return out


def pair_report(statuses: list[str], cuts: list[str], sources: list[str], max_seq_length: int) -> list[str]:
    """One line for dropped pairs and one for truncated ones (where the cut fell); none when all
    went in whole."""

    def some(rows: list[str]) -> str:
        return ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")

    lines = []
    dropped = [s for s, status in zip(sources, statuses, strict=True) if status == TOO_LONG]
    if dropped:
        lines.append(
            f"{len(dropped)} pairs dropped: longer than max_seq_length {max_seq_length} tokens "
            f"({some(dropped)})"
        )
    truncated = [(s, c) for s, c, status in zip(sources, cuts, statuses, strict=True) if status == TRUNCATED]
    if truncated:
        prompt = sum("prompt" in c for _, c in truncated)
        answer = sum("answer" in c for _, c in truncated)
        lines.append(
            f"{len(truncated)} pairs truncated to max_seq_length {max_seq_length} tokens: {prompt} in the "
            f"prompt (its start cut), {answer} in the answers (their end cut) "
            f"({some([s for s, _ in truncated])})"
        )
    return lines


def pair_lines(dataset, unpaired: bool) -> list[str]:
    """The audit's lines about the pairs as trained: the tokens of each side's answer (all trained),
    of the prompt (never), and for KTO how many rows are desirable."""

    def median(values: list[int]) -> int:
        return sorted(values)[len(values) // 2] if values else 0

    prompts = dataset["prompt_length"]
    chosen = [len(ids) - n for ids, n in zip(dataset["input_ids"], prompts, strict=True)]
    if unpaired:
        desirable = sum(bool(label) for label in dataset["label"])
        return [
            f"unpaired rows: {desirable} desirable, {len(chosen) - desirable} undesirable; the completion's "
            f"{sum(chosen)} tokens are trained (median {median(chosen)}), the prompt's {sum(prompts)} never"
        ]
    rejected = [len(ids) for ids in dataset["rejected_ids"]]
    return [
        f"pairs: {len(chosen)}; trained tokens: chosen {sum(chosen)} (median {median(chosen)}), rejected "
        f"{sum(rejected)} (median {median(rejected)}); prompt tokens {sum(prompts)} (median "
        f"{median(prompts)}), never trained"
    ]
