"""Data in memory, for the tests: the rows of a file, a tokenizer, and rows tokenized and put through
the length policy without the store, so the store (finetune/data/store.py, which does the same on
disk over data of any size) and the trainer can be held to a plain in-memory reference."""

from __future__ import annotations

from dataclasses import replace

from finetune.base.errors import UserError
from finetune.data.rows import Conversation, iter_conversations
from finetune.data.tokenize import (
    ChatTokenizer,
    Example,
    Prepared,
    length_policy,
    locate_tokenizer,
    nothing_left_error,
    resolve_chat_template,
    tokenize_conversations,
)
from finetune.recipe.schema import DataSection


def load_conversations(
    files: list[str],
    row_format: str = "auto",
    columns: dict[str, str] | None = None,
    skipped: list[str] | None = None,
) -> list[Conversation]:
    """Every row of every source, in memory (see rows.iter_conversations)."""
    return list(iter_conversations(files, row_format, columns, skipped))


def find_tokenizer(model_name: str, chat_template: str | None = None) -> ChatTokenizer | None:
    """The model's tokenizer (see tokenize.locate_tokenizer), loaded; ``chat_template`` (a shipped
    name or a file) replaces its own template."""
    source = locate_tokenizer(model_name)
    if source is None:
        return None
    found = source.load()
    if chat_template is None:
        return found
    return replace(
        found,
        chat_template=resolve_chat_template(chat_template),
        origin=f"{found.origin}, template {chat_template}",
    )


def prepare(
    conversations: list[Conversation], tokenizer: ChatTokenizer, data: DataSection, max_seq_length: int
) -> Prepared:
    """Tokenize, then apply the recipe's policy to rows longer than ``max_seq_length``, in memory."""
    prepared = Prepared(examples=[])
    for result in tokenize_conversations(tokenizer, conversations, data.train_on_responses_only):
        if isinstance(result, UserError):
            raise result
        example, status = length_policy(result, max_seq_length, data.overlong)
        prepared.record(example, status)
    if conversations and not prepared.examples:
        raise nothing_left_error(conversations[0].source, prepared.report(max_seq_length))
    return prepared


def examples_dataset(examples: list[Example]):
    """Examples held in memory as the trainer's dataset (datasets is imported here: e2e only)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
