"""Recipe lineage: `runner.py copy` (an editable copy that records its parent) and `runner.py diff`
(what a recipe changes against its parent, after both are resolved)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from finetune.base.errors import UserError
from finetune.recipe.documents import SHIPPED_DIR, extends_target, find_recipe, node_at, read_document
from finetune.recipe.paths import expand_home, path_from, relocated_inputs
from finetune.recipe.schema import SCHEMA_FILE, Recipe, load_recipe, recipe_dict

UNSET = "(unset)"  # a value one side of a diff does not have


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _retitled(header: list[str], parent_path: Path, name: str, version: str, destination: Path) -> list[str]:
    """The parent's header comments, made true of the copy: its first line names the copy and its
    parent, and a command line that ran the parent runs the copy."""
    comments = [
        i for i, line in enumerate(header) if line.startswith("#") and "yaml-language-server" not in line
    ]
    title = f"# {destination.stem}: a copy of {name} {version}; say here what it is for. {name}'s notes:\n"
    header = list(header)
    if comments:
        header[comments[0]] = title
    else:
        header.append(title)
    for spelling in {str(parent_path), f"recipes/{parent_path.name}"}:
        header = [
            line.replace(spelling, str(destination)) if line.startswith("#") else line for line in header
        ]
    return header


def copy_recipe(source: str, destination: Path) -> Path:
    """An editable copy that keeps the parent's comments and records its name, version and hash."""
    parent_path = find_recipe(source)
    parent = load_recipe(parent_path)
    if destination.exists():
        raise UserError(f"'{destination}' already exists; choose another name (nothing was overwritten)")
    if destination.suffix not in (".yaml", ".yml"):
        raise UserError(f"'{destination}': a recipe file name ends in .yaml")
    name = parent_path.stem if parent_path.resolve().parent == SHIPPED_DIR else str(parent_path)
    record = (
        "# Copied with `runner.py copy`; `runner.py diff` shows what you changed since.\n"
        f"parent:\n  name: {name}\n  version: {parent.version}\n  sha256: {file_sha256(parent_path)}\n"
    )
    lines = _without_parent_block(_relocated(parent_path, destination).splitlines(keepends=True))
    schema_comment = f"# yaml-language-server: $schema={os.path.relpath(SCHEMA_FILE, destination.parent)}\n"
    lines = [schema_comment if line.startswith("# yaml-language-server:") else line for line in lines]
    first_key = next(i for i, line in enumerate(lines) if line[:1].isalpha())
    lines[:first_key] = _retitled(lines[:first_key], parent_path, name, parent.version, destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text("".join(lines[:first_key] + [record] + lines[first_key:]))
    return destination


def _relocated(source: Path, destination: Path) -> str:
    """The text of ``source`` with each relative path it names (its inputs, a path `extends`)
    rewritten to reach the same file from ``destination``'s folder; comments and layout kept."""
    document = read_document(source)
    moved = relocated_inputs(document.raw, source, destination)
    extends = document.raw.get("extends")
    if isinstance(extends, str) and (extends.endswith((".yaml", ".yml")) or "/" in extends):
        if not expand_home(extends).is_absolute():
            target = os.path.normpath(source.parent.resolve() / extends)
            moved[("extends",)] = path_from(destination.parent, target)
    lines = source.read_text().splitlines(keepends=True)
    # Each node once (an alias is the node it names), last first, so that an edit never shifts the
    # columns of one still to make on its line.
    nodes = {}
    for path, text in moved.items():
        node = node_at(document.root, path)
        if node is not None:
            nodes[id(node)] = (node.start_mark, node.end_mark, text)
    for start, end, text in sorted(nodes.values(), key=lambda s: (s[0].line, s[0].column), reverse=True):
        if start.line != end.line:
            raise UserError(
                f"{source}:{start.line + 1}: this path is folded over lines; copy rewrites it for the "
                "copy's folder: write it on one line (nothing was copied)"
            )
        line = lines[start.line]
        # The node's span begins at its &anchor or !tag, which stay.
        kept = re.match(r"(?:[&!]\S*\s+)*", line[start.column : end.column]).end()
        lines[start.line] = line[: start.column + kept] + _scalar(text) + line[end.column :]
    return "".join(lines)


def _scalar(text: str) -> str:
    """``text`` as a YAML string: plain where YAML reads it back as that string, else quoted."""
    try:
        plain = yaml.safe_load(text) == text and "#" not in text and ": " not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _without_parent_block(lines: list[str]) -> list[str]:
    """Drop an earlier copy's lineage block, so a copy of a copy records only its own parent."""
    out, skipping = [], False
    for line in lines:
        if line.startswith("parent:") or line.startswith("# Copied with `runner.py copy`"):
            skipping = line.startswith("parent:")
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def parent_of(path: Path) -> tuple[Path, Recipe, str | None]:
    """The parent a recipe is compared with: its `extends` target, else its copy record.

    Returns the parent's path, its resolved recipe, and a note when the parent changed since the copy.
    """
    child_raw = read_document(path).raw
    if "extends" in child_raw:
        parent_path = extends_target(child_raw["extends"], read_document(path))
        return parent_path, load_recipe(parent_path), None
    recipe = load_recipe(path)
    if recipe.parent is None:
        raise UserError(f"{path}: has no parent (neither `extends:` nor a `parent:` record from copy)")
    parent_path = find_recipe(recipe.parent.name)
    if not parent_path.is_file():
        raise UserError(f"{path}: parent '{recipe.parent.name}' no longer exists")
    note = None
    if file_sha256(parent_path) != recipe.parent.sha256:
        current = load_recipe(parent_path).version
        note = (
            f"{recipe.parent.name} changed since the copy (copied at version {recipe.parent.version}, "
            f"now {current}); the differences below are against its current content"
        )
    return parent_path, load_recipe(parent_path), note


def diff_recipes(parent: Recipe, child: Recipe) -> list[tuple[str, Any, Any]]:
    """(field, parent value, child value) for every resolved value that differs, lineage excluded."""
    old, new = _flatten(recipe_dict(parent)), _flatten(recipe_dict(child))
    keys = [k for k in dict.fromkeys([*old, *new]) if not k.startswith("parent.")]
    return [
        (key, old.get(key, UNSET), new.get(key, UNSET))
        for key in keys
        if old.get(key, UNSET) != new.get(key, UNSET)
    ]
