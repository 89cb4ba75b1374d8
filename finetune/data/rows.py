"""Reading training rows and turning them into chat conversations.

Pure Python (no torch; `datasets` only for a recipe that names a Hugging Face dataset): rows are
streamed and checked before the model is loaded, and a bad row is reported with its file and line.
Every supported format becomes OpenAI-style ``messages``, which the tokenizer's chat template then
renders. Content is passed through byte for byte: code keeps its indentation, tabs and trailing
newlines.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import random
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.base.errors import UserError
from finetune.base.files import not_a_file
from finetune.base.json_text import json_value
from finetune.recipe.paths import HUB_NAME, is_hub_dataset

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Conversation:
    """One training row. Chat rows have ``messages`` (rendered by the chat template); raw rows
    (prompt/completion, plain text) have ``segments``: (text, trained) pieces joined as they are."""

    source: str  # file:line, for every message about this row
    messages: list[dict[str, str]] | None = None
    segments: list[tuple[str, bool]] | None = None


READABLE = (".jsonl", ".json", ".csv", ".parquet")
# Long code is normal data: a field of a CSV file may be as long as a file (the csv module's
# default limit of 128 KiB would refuse a long solution).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
# What each format's rows must hold, in the order auto-detection tries them.
_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_ALL_FIELDS = {key for keys in _REQUIRED.values() for key in keys} | {"input"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def data_kind(path: Path) -> str:
    """'.jsonl', '.json', '.csv' or '.parquet' (the first three also gzip-compressed), else ''."""
    if path.suffix == ".gz":
        inner = path.suffixes[-2] if len(path.suffixes) > 1 else ""
        return inner if inner in (".jsonl", ".json", ".csv") else ""
    return path.suffix if path.suffix in READABLE else ""


def iter_rows(
    path: Path | HubSplit, skipped: list[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a .jsonl or .csv file, (index + 1, row) from a .json list or a
    .parquet file; the first three may be gzip-compressed. Streamed: a .jsonl, .csv or .parquet file
    of any size is read a line or a batch at a time (a .json list is parsed whole). A malformed line
    stops with its file:line, or, given a ``skipped`` list, is recorded there and passed over."""
    if isinstance(path, HubSplit):
        yield from _hub_rows(path)
        return
    why = not_a_file(path)
    if why:
        raise UserError(f"data file '{path}' {why}")
    skipped_before = len(skipped) if skipped is not None else 0
    kind = data_kind(path)
    if kind not in READABLE:
        raise UserError(
            f"data file '{path}': unsupported extension '{''.join(path.suffixes[-2:])}' "
            "(use .jsonl, .json or .csv, optionally .gz, or .parquet)"
        )
    readers = {".parquet": _parquet_rows, ".csv": _csv_rows, ".json": _json_rows, ".jsonl": _jsonl_rows}
    found, number = False, 0
    try:
        for number, row in readers[kind](path, skipped):
            if isinstance(row, dict):
                found = True
                yield number, row
            else:
                _bad_row(f"{path}:{number}: each row must be a JSON object", skipped)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # .gz: not gzip, corrupt or cut short
        after = f" after line {number}" if number else ""
        raise UserError(
            f"{path}: the gzip file is damaged or cut short{after} ({exc}); compress it again "
            "(gzip -t checks one)"
        ) from None
    if not found:
        bad = len(skipped) - skipped_before if skipped is not None else 0
        raise UserError(
            f"data file '{path}' has no rows" + (f" that could be read ({bad} bad)" if bad else "")
        )


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _not_utf8(path: Path, line: int, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{path}:{line}: not valid UTF-8 (byte {exc.object[exc.start]:#04x})")


def _jsonl_rows(path: Path, skipped: list[str] | None) -> Iterator[tuple[int, Any]]:
    with _open_binary(path) as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM, as Windows tools write
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, number, exc) from None
            if not line.strip():
                continue
            problem, row = json_value(line)
            if problem:
                _bad_row(f"{path}:{number}: {problem}", skipped)
                continue
            yield number, row


def _json_rows(path: Path, skipped: list[str] | None) -> Iterator[tuple[int, Any]]:
    with _open_binary(path) as file:
        raw = file.read()
    try:
        text = raw.decode("utf-8-sig")  # with or without a BOM
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, raw[: exc.start].count(b"\n") + 1, exc) from None
    problem, rows = json_value(text)
    if problem:
        raise UserError(f"{path}: {problem}")
    if not isinstance(rows, list):
        raise UserError(f"{path}: a .json data file must hold a list of rows")
    yield from enumerate(rows, start=1)


def _csv_rows(path: Path, skipped: list[str] | None) -> Iterator[tuple[int, Any]]:
    # One row per record, numbered by the line it ends on; quoted fields may span lines.
    with _open_binary(path) as file:
        # utf-8-sig: Excel writes a BOM, which would otherwise become part of the first column's name.
        text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        try:
            header = reader.fieldnames or []
            twice = next((name for name in header if header.count(name) > 1), None)
            if twice is not None:  # DictReader would keep only the last of the two columns
                raise UserError(f"{path}:1: the header names the column '{twice}' twice")
            for row in reader:
                # DictReader files extra fields under None and fills missing ones with None;
                # either way the record does not match its header, and no field may be lost.
                extra = row.pop(None, [])
                missing = sum(value is None for value in row.values())
                if extra or missing:
                    fields = len(header) - missing + len(extra)
                    _bad_row(
                        f"{path}:{reader.line_num}: {fields} fields where the header has {len(header)}",
                        skipped,
                    )
                    continue
                yield reader.line_num, row
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, reader.line_num + 1, exc) from None


def _hub_rows(source: HubSplit) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, row in enumerate(load_hub_split(source), start=1):
        yield number, {k: v for k, v in row.items() if v is not None}


def load_hub_split(source: HubSplit):
    """A hub dataset split: downloaded and cached by `datasets` (memory-mapped Arrow files), or,
    offline, taken from that cache."""
    from datasets import load_dataset  # 2 s to import; only a recipe naming a hub dataset pays it

    try:
        return load_dataset(source.name, split=source.split)
    except Exception as exc:  # datasets raises many types (offline, unknown name or split, auth)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " (the hub is not reachable and the dataset is not in the local cache)"
        raise UserError(
            f"'{source.name}' is not a local file or folder, and as a Hugging Face dataset ({source}) "
            f"it could not be loaded: {first_line}" + (offline if "offline" in first_line.lower() else "")
        ) from None


def _parquet_rows(path: Path, skipped: list[str] | None) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # light (no torch); parquet keeps nested chat messages as lists

    number = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                # A column is null in rows that lack it (one table, one schema): such keys are absent.
                yield number, {k: v for k, v in row.items() if v is not None}
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and kin: a corrupt or truncated file
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None


# owner/name, or owner/name[split]: a dataset on the Hugging Face hub (or in its local cache).
@dataclass(frozen=True)
class HubSplit:
    """One split of a Hugging Face dataset, named in a recipe as owner/name or owner/name[split]."""

    name: str
    split: str

    def __str__(self) -> str:
        return f"{self.name}[{self.split}]"


def hub_split(entry: str, default_split: str = "train") -> HubSplit | None:
    """The hub dataset an entry names, or None when it names a local path (or looks like one)."""
    if not is_hub_dataset(entry, Path.cwd()):
        return None
    match = HUB_NAME.fullmatch(entry)
    return HubSplit(match.group(1), match.group(2) or default_split)


def expand_files(names: list[str], default_split: str = "train") -> list[Path | HubSplit]:
    """Data sources as named; a folder stands for every readable file below it, in sorted order; a
    name that is not on disk and reads owner/name[split] is a Hugging Face dataset."""
    paths: list[Path | HubSplit] = []
    for name in names:
        path = Path(name)
        hub = hub_split(name, default_split)
        if hub is not None:
            paths.append(hub)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and data_kind(p) in READABLE)
            if not found:
                raise UserError(f"data folder '{path}' holds no .jsonl, .json, .csv or .parquet file")
            paths += found
        else:
            paths.append(path)
    return paths


def _bad_row(message: str, skipped: list[str] | None) -> None:
    if skipped is None:
        raise UserError(message)
    skipped.append(message)


def detect_format(row: dict[str, Any]) -> str | None:
    return next((fmt for fmt, keys in _REQUIRED.items() if all(k in row for k in keys)), None)


def sharegpt_to_messages(turns: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT's from/value turns as OpenAI-style messages (human -> user, gpt -> assistant)."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise UserError(
                f"{where}: conversations[{i}] is from '{turn['from']}'; use one of {sorted(_SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _raw_segments(row: dict[str, Any], fmt: str, where: str) -> list[tuple[str, bool]]:
    """prompt + completion (only the completion trained), or a plain text trained whole."""
    keys = _REQUIRED[fmt]
    for key in keys:
        if not isinstance(row[key], str):
            raise UserError(f"{where}: '{key}' must be a string")
    if fmt == "text":
        if not row["text"]:
            raise UserError(f"{where}: 'text' is empty, so nothing would be trained")
        return [(row["text"], True)]
    if not row["completion"]:
        raise UserError(f"{where}: 'completion' is empty, so nothing would be trained")
    return [(row["prompt"], False), (row["completion"], True)]


def alpaca_to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Alpaca's instruction + optional input become the user turn; output becomes the assistant turn."""
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def checked_messages(messages: Any, where: str, key: str = "messages") -> list[dict[str, str]]:
    """Each message of a non-empty list as {role, content}, or one sentence naming the first wrong
    one (SFT's conversations and preference pairs' message lists alike)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{key}' must be a non-empty list")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise UserError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        # Parquet and hub datasets give every message every field of the column's type, mostly null
        # ("name", "tool_calls"); a null says nothing and is left out. Anything else would be lost.
        extra = sorted(str(k) for k, v in message.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise UserError(
                f"{where}: {key}[{i}] has {', '.join(map(repr, extra))} besides 'role' and 'content'; "
                "only those two are trained on, so remove the rest from the data"
            )
        if not isinstance(message["role"], str) or message["role"] not in ROLES:
            raise UserError(f"{where}: {key}[{i}] has role '{message['role']}'; use one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: {key}[{i}].content must be a string")
        cleaned.append({"role": message["role"], "content": message["content"]})
    return cleaned


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    cleaned = checked_messages(messages, where)
    if not any(m["role"] == "assistant" for m in cleaned):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return cleaned


def iter_conversations(
    files: list[str],
    row_format: str = "auto",
    columns: dict[str, str] | None = None,
    skipped: list[str] | None = None,
    default_split: str = "train",
    read: Callable[[dict[str, Any], str], Any] | None = None,
) -> Iterator[Conversation]:
    """Every row of every source, with its file:line: chat messages, or raw text segments; streamed
    a row at a time. ``columns`` maps our field names to the dataset's (e.g. completion:
    canonical_solution). A bad row stops with its file:line, or, given a ``skipped`` list, is
    recorded there and passed over. ``read(row, where)``: another reader of a row (preference
    pairs, data/preference.py), after ``columns``."""
    found = False
    for path in expand_files(files, default_split):
        for number, row in iter_rows(path, skipped):
            try:
                if read is not None:
                    mapped = {**row, **{o: row[t] for o, t in (columns or {}).items() if t in row}}
                    conversation = read(mapped, f"{path}:{number}")
                else:
                    conversation = _conversation(row, f"{path}:{number}", row_format, columns)
            except UserError as exc:
                _bad_row(str(exc), skipped)
                continue
            found = True
            yield conversation
    if files and not found:
        raise UserError(f"no row of {', '.join(files)} could be read ({len(skipped or [])} skipped as bad)")


def skipped_report(skipped: list[str]) -> list[str]:
    """The line every plan and run prints about rows skipped as malformed (none when none were)."""
    if not skipped:
        return []
    more = f"; and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return [f"{len(skipped)} bad rows skipped (data.bad_rows: skip): {skipped[0]}{more}"]


def _columns_hint(row: dict[str, Any]) -> str:
    """How data.columns would read this row, built from its own text fields: the usual fix for a
    file whose fields are named otherwise (question/answer)."""
    texts = [key for key, value in row.items() if isinstance(value, str) and key not in _ALL_FIELDS]
    if len(texts) >= 2:
        mapping = f"{{prompt: {texts[0]}, completion: {texts[1]}}}"
    elif len(texts) == 1:
        mapping = f"{{text: {texts[0]}}}"
    else:
        return ""
    return f"; to read it under other names, map them with data.columns, e.g. data.columns={mapping}"


def _conversation(
    row: dict[str, Any], where: str, row_format: str, columns: dict[str, str] | None
) -> Conversation:
    if columns:
        row = {**row, **{ours: row[theirs] for ours, theirs in columns.items() if theirs in row}}
    fmt = row_format if row_format != "auto" else detect_format(row)
    if fmt is None or not all(key in row for key in _REQUIRED[fmt]):
        found = ", ".join(sorted(row)) or "nothing"
        wanted = (
            " or ".join(f"{' and '.join(repr(k) for k in keys)} ({f})" for f, keys in _REQUIRED.items())
            if fmt is None
            else " and ".join(repr(k) for k in _REQUIRED[fmt])
        )
        raise UserError(f"{where}: expected {wanted} but the row has {found}{_columns_hint(row)}")
    if fmt == "messages":
        return Conversation(where, _check_messages(row["messages"], where))
    if fmt == "sharegpt":
        return Conversation(where, _check_messages(sharegpt_to_messages(row["conversations"], where), where))
    if fmt == "alpaca":
        return Conversation(where, _check_messages(alpaca_to_messages(row), where))
    return Conversation(where, segments=_raw_segments(row, fmt, where))


def hold_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded random ``fraction`` of ``count`` rows (at least one) held
    out for evaluation, both in file order. The same count, fraction and seed give the same split."""
    held_count = max(1, math.ceil(count * fraction))
    if held_count >= count:
        raise UserError(f"data.eval_fraction {fraction} of {count} rows would leave nothing to train on")
    held = set(random.Random(seed).sample(range(count), held_count))
    return [i for i in range(count) if i not in held], sorted(held)


def source_file(source: str) -> str:
    """The file (or hub split) part of a row's file:line."""
    return source.rsplit(":", 1)[0]


def mix(files: list[str], weights: dict[str, float], seed: int) -> list[int]:
    """Row indices, given each row's file, with the rows of each weighted source repeated ``weight``
    times: the whole part as copies, the fraction as a seeded random share of its rows (1.5 = every
    row once plus a random half again; 0.25 = a random quarter). A folder's weight applies to every
    file in it; unweighted sources keep 1.0."""
    weight_of = {str(path): w for entry, w in weights.items() for path in expand_files([entry])}
    by_file: dict[str, list[int]] = {}
    for index, file in enumerate(files):
        by_file.setdefault(file, []).append(index)
    rng = random.Random(seed)
    mixed = []
    for file, group in by_file.items():
        weight = weight_of.get(file, 1.0)
        copies, fraction = int(weight), weight - int(weight)
        extra = sorted(rng.sample(range(len(group)), round(fraction * len(group))))
        mixed += group * copies + [group[i] for i in extra]
    return mixed


def mixing_report(rows: int, mixed: int, weights: dict[str, float]) -> list[str]:
    if not weights:
        return []
    parts = ", ".join(f"{entry} x{w:g}" for entry, w in weights.items())
    return [f"mixing {parts}: {rows} rows became {mixed}"]
