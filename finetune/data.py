"""Reading training rows and turning them into chat conversations.

Pure Python (no torch, no datasets): rows are checked before the model is loaded, and a bad row is
reported with its file and line. Every supported format becomes OpenAI-style ``messages``, which
the tokenizer's chat template then renders. Content is passed through byte for byte: code keeps its
indentation, tabs and trailing newlines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.recipe import RecipeError

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Conversation:
    source: str  # file:line, for every message about this row
    messages: list[dict[str, str]]


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a .jsonl file, or (index + 1, row) from a .json list."""
    if not path.is_file():
        raise RecipeError(f"data file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise RecipeError(f"{path}: a .json data file must hold a list of rows")
        numbered = list(enumerate(rows, start=1))
    elif path.suffix == ".jsonl":
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    else:
        raise RecipeError(f"data file '{path}': unsupported extension '{path.suffix}' (use .jsonl or .json)")
    for number, row in numbered:
        if not isinstance(row, dict):
            raise RecipeError(f"{path}:{number}: each row must be a JSON object")
    if not numbered:
        raise RecipeError(f"data file '{path}' has no rows")
    return numbered


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def alpaca_to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Alpaca's instruction + optional input become the user turn; output becomes the assistant turn."""
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecipeError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise RecipeError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RecipeError(
                f"{where}: messages[{i}] has role '{message['role']}'; use one of {sorted(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise RecipeError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecipeError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return messages


def load_conversations(files: list[str], row_format: str = "auto") -> list[Conversation]:
    """Every row of every file, as chat messages with the row's file:line."""
    conversations = []
    for name in files:
        path = Path(name)
        for number, row in read_rows(path):
            where = f"{path}:{number}"
            fmt = row_format if row_format != "auto" else detect_format(row)
            if fmt == "messages" and "messages" in row:
                conversations.append(Conversation(where, _check_messages(row["messages"], where)))
            elif fmt == "alpaca" and "instruction" in row and "output" in row:
                converted = alpaca_to_messages(row)
                conversations.append(Conversation(where, _check_messages(converted, where)))
            else:
                expected = "'messages'" if fmt == "messages" else "'instruction' and 'output'"
                found = ", ".join(sorted(row)) or "nothing"
                if fmt is None:
                    expected = "'messages' (chat) or 'instruction' and 'output' (alpaca)"
                raise RecipeError(f"{where}: expected {expected} but the row has {found}")
    return conversations
