"""Recipe lineage: `runner.py copy` (an editable copy that records its parent) and `runner.py diff`
(what a recipe changes against its parent, after both are resolved)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.recipe import SCHEMA_FILE, Recipe, load_recipe, recipe_dict
from finetune.recipe_files import SHIPPED_DIR, extends_target, find_recipe, read_document

UNSET = "(unset)"  # a value one side of a diff does not have


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    lines = _without_parent_block(parent_path.read_text().splitlines(keepends=True))
    schema_comment = f"# yaml-language-server: $schema={os.path.relpath(SCHEMA_FILE, destination.parent)}\n"
    lines = [schema_comment if line.startswith("# yaml-language-server:") else line for line in lines]
    first_key = next(i for i, line in enumerate(lines) if line[:1].isalpha())
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text("".join(lines[:first_key] + [record] + lines[first_key:]))
    return destination


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
