"""Where a recipe's relative paths point: the one rule, in one place.

The files a recipe reads (data.train and data.eval entries, data.weights' keys, a data.chat_template
file, an evaluate.tasks file, a model.name folder, a model.adapter run folder) are found relative to
the folder of the recipe file that names them, as `extends` already was: a recipe and its data move
together, and a shipped recipe runs from any directory. A relative path in a command-line override
is read from the current directory, as any path typed on a command line is. output.dir, where runs
are written, is relative to the current directory: runs land where you work.

Loading rewrites each input to the path this process opens: relative to the current directory when
it lies below it (the short form messages show), else absolute. The recipe a run saves holds them
absolute, so `resume`, `export` and `generate` find them from any directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HUMANEVAL = "humaneval"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gz")
# owner/name or owner/name[split]: a Hugging Face dataset when no such path exists
HUB_NAME = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:\[([\w.-]+)\])?")
RULE = "a recipe's relative paths are read from its own folder"


def expand_home(value: str) -> Path:
    """``~`` and ``~user`` expanded; an unknown user's ``~name`` is left as written (and then not found),
    where Path.expanduser would raise."""
    return Path(os.path.expanduser(value))


def shown(path: Path) -> str:
    """``path`` as this process opens it and messages show it: below the current directory, relative
    to it (data_samples/code_chat.jsonl); elsewhere, absolute."""
    path = Path(os.path.normpath(Path.cwd() / expand_home(str(path))))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def is_hub_dataset(entry: str, base: Path) -> bool:
    """A data entry names a Hugging Face dataset when it reads owner/name[split], does not look like
    a file (no data extension, not absolute, not ./ or ~) and no such path exists from ``base``."""
    if HUB_NAME.fullmatch(entry) is None or entry.startswith((".", "~", "/")):
        return False
    plain = entry.split("[", 1)[0]
    # os.path, not Path: a name too long or a folder without permission is "not there", no traceback
    return not plain.endswith(DATA_SUFFIXES) and not os.path.exists(base / entry)


def _is_local(kind: str, value: str, base: Path) -> bool:
    if kind == "data":
        return not is_hub_dataset(value, base)
    if kind == "model":  # a folder, or a hub id (owner/name) or the tiny model's name
        return value.startswith((".", "/", "~")) or os.path.isdir(base / expand_home(value))
    if kind == "template":  # a file (.jinja or not), or a shipped template's name
        return (
            value.endswith(".jinja")
            or value.startswith((".", "/", "~"))
            or "/" in value
            or os.path.exists(base / value)
        )
    if kind == "run":  # a run folder, always on this machine
        return True
    return value != HUMANEVAL  # tasks: a file, or HumanEval's own


def _inputs(raw: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], str, str]]:
    """(key path, kind, value) of every path-shaped input in a recipe mapping; anything not a
    string is left to the schema to refuse."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key in ("train", "eval"):
        entries = data.get(key)
        if isinstance(entries, str):
            yield ("data", key), "data", entries
        elif isinstance(entries, list):
            for i, entry in enumerate(entries):
                if isinstance(entry, str):
                    yield ("data", key, i), "data", entry
    if isinstance(data.get("weights"), dict):
        for entry in data["weights"]:
            if isinstance(entry, str):
                yield ("data", "weights", entry), "data", entry
    for section, key, kind in (("data", "chat_template", "template"), ("evaluate", "tasks", "tasks")):
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            yield (section, key), kind, node[key]
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and model["name"]:
        yield ("model", "name"), "model", model["name"]
    if isinstance(model, dict) and isinstance(model.get("adapter"), str) and model["adapter"]:
        yield ("model", "adapter"), "run", model["adapter"]


def _replace(raw: dict[str, Any], path: tuple[Any, ...], value: str) -> None:
    """Set a list item or a mapping value; data.weights' keys are renamed by _rename_weights."""
    *parents, last = path
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value


def _rename_weights(raw: dict[str, Any], renamed: dict[str, str], where: dict[str, str]) -> list[str]:
    """data.weights with its keys renamed at once (keeping their order); two keys that name one file
    are a problem said, not a weight silently lost."""
    weights = raw["data"]["weights"]
    rebuilt: dict[str, Any] = {}
    problems = []
    for key, weight in weights.items():
        new = renamed.get(key, key)
        if new in rebuilt:
            problems.append(f"{where.get(key, 'data.weights')}: data.weights names {new} twice")
        rebuilt[new] = weight
    weights.clear()
    weights.update(rebuilt)
    return problems


def resolve_inputs(raw: dict[str, Any], origin) -> list[str]:
    """Rewrite each input of ``raw`` to the path this process opens (see the module's rule), and
    say of each local one that is not there where it was written, the path tried, and the path the
    current directory would have given when that one exists.

    ``origin(key path)`` says who wrote the value: (where, folder), where is "file:line" or the
    override's text and folder is what a relative path is read from."""
    missing, renamed, wrote = [], {}, {}
    for path, kind, value in list(_inputs(raw)):
        where, base = origin(path)
        if not value.strip():
            continue  # the schema refuses an empty name
        if not _is_local(kind, value, base):
            if kind == "model" and base != Path.cwd() and os.path.isdir(Path.cwd() / value):
                # a folder only from the current directory: the old rule's reading, said as such
                missing.append(_not_found(where, path, value, Path(os.path.normpath(base / value)), base))
            continue
        target = Path(os.path.normpath(base / expand_home(value)))
        if path[:2] == ("data", "weights"):
            renamed[value], wrote[value] = _as_opened(kind, target), where
        else:
            _replace(raw, path, _as_opened(kind, target))
        # lexists: a broken link or a loop of links is there, and its reader says which it is.
        # A tasks file is read only when HumanEval runs, and checked then; a weights key must be
        # one of data.train (the schema says so), whose entries are checked here.
        checked = kind != "tasks" or _evaluates(raw)
        if not os.path.lexists(target) and checked and path[:2] != ("data", "weights"):
            missing.append(_not_found(where, path, value, target, base))
    if renamed:
        missing += _rename_weights(raw, renamed, wrote)
    return list(dict.fromkeys(missing))


def _as_opened(kind: str, target: Path) -> str:
    """shown(target); a model folder keeps a leading ./ so that it never reads as a hub id."""
    text = shown(target)
    return f"./{text}" if kind == "model" and not text.startswith((".", "/")) else text


def _evaluates(raw: dict[str, Any]) -> bool:
    return isinstance(raw.get("evaluate"), dict) and raw["evaluate"].get("humaneval") is True


def _not_found(where: str, path: tuple[Any, ...], value: str, target: Path, base: Path) -> str:
    dotted = ".".join(str(k) for k in path[:2])
    said = f"{where}: {dotted} '{value}': {target} does not exist"
    other = Path(os.path.normpath(Path.cwd() / expand_home(value)))
    if other != target and os.path.exists(other):
        said += f" ({RULE}); {other}, from the current directory, does: write '{path_from(base, str(other))}'"
    return said


def absolute_inputs(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a loaded recipe's plain data) with every local input absolute: what a run saves."""
    renamed = {}
    for path, kind, value in list(_inputs(raw)):
        if value.strip() and _is_local(kind, value, Path.cwd()):
            absolute = str(Path(os.path.normpath(Path.cwd() / expand_home(value))))
            if path[:2] == ("data", "weights"):
                renamed[value] = absolute
            else:
                _replace(raw, path, absolute)
    if renamed:
        _rename_weights(raw, renamed, {})
    return raw


def relocated_inputs(raw: dict[str, Any], source: Path, destination: Path) -> dict[tuple[Any, ...], str]:
    """For a recipe file copied from ``source`` to ``destination``: each relative input it names
    itself, rewritten so it still points at the same file from the copy's folder."""
    moved = {}
    for path, kind, value in _inputs(raw):
        if expand_home(value).is_absolute() or not _is_local(kind, value, source.parent):
            continue
        moved[path] = path_from(destination.parent, os.path.normpath(source.parent.resolve() / value))
    return moved


def path_from(folder: Path, target: str) -> str:
    """How a recipe in ``folder`` names ``target``: relative when the two share a folder below the
    root (data beside its recipes), else absolute (../../../ is harder to read than the place)."""
    folder = os.path.normpath(folder.absolute())
    if os.path.commonpath([folder, target]) == os.path.dirname(os.sep):
        return target
    return os.path.relpath(target, folder)
