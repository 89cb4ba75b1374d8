"""Recipe files: reading YAML, following `extends`, applying overrides, and saying where a value came from.

schema.py holds the schema and validates what this module reads; the split keeps each readable on
its own. Line numbers are kept (the composed YAML nodes) so that every error names file and line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.base.errors import UserError
from finetune.base.files import CHECKOUT

SHIPPED_DIR = CHECKOUT / "recipes"  # the shipped recipes, by the product's design at the top level


@dataclass
class Document:
    """One YAML file of a recipe's `extends` chain, kept for line numbers in error messages."""

    source: str
    root: yaml.Node
    raw: dict[str, Any]


def shipped_recipes() -> list[Path]:
    return sorted(SHIPPED_DIR.rglob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given, or the shipped recipe of that name (``code-gen`` -> recipes/code-gen.yaml)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.yaml"
    if shipped.exists() and shipped.is_relative_to(Path.cwd()):
        return shipped.relative_to(Path.cwd())  # shorter in messages: recipes/code-gen.yaml
    if not shipped.exists():
        names = [p.stem for p in shipped_recipes()]
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; shipped recipes: {', '.join(names)}"
        raise UserError(f"no recipe named '{name_or_path}'{hint}")
    return shipped


def duplicate_keys(node: yaml.Node, source: str) -> list[str]:
    """YAML silently keeps the last of two equal keys; a recipe must not, so they are reported."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.value in seen:
                first = seen[key.value]
                problems.append(f"{source}:{line}: key '{key.value}' is repeated (first on line {first})")
            seen.setdefault(key.value, line)
            problems += duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems += duplicate_keys(item, source)
    return problems


MAX_DEPTH = 32  # a recipe is section, key, value (a list of lists at most): deeper is not a recipe
MAX_VALUES = 10_000  # values aliases may add (a recipe holds a few hundred); aliases of aliases make billions
MAX_DIGITS = 100  # no setting needs a longer number; Python refuses to read one past 4,300 digits


class _Refused(yaml.YAMLError):
    """YAML that parses but that no recipe is: too deep, too many values through aliases, a number
    too long to be a setting. Raised before anything walks or converts it."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


# libyaml's parser where PyYAML was built with it (ten times faster on a large file), else PyYAML's.
class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(ch.isdigit() for ch in node.value)
        if digits > MAX_DIGITS:
            raise _Refused(f"a number of {digits:,} digits, far past any setting's range", node.start_mark)
        return super().construct_yaml_int(node)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


def _check_depth(text: str) -> None:
    """Refuse nesting past MAX_DEPTH from the parser's events (no recursion: a document nested
    100,000 deep would exhaust Python's stack in the composer)."""
    depth = 0
    for event in yaml.parse(text, Loader=_RecipeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_VALUES values (or into itself), counted
    on the composed nodes once each, before any walk visits an alias again."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise _Refused("an alias refers to the value that holds it", node.start_mark)
            return sizes[id(node)]
        sizes[id(node)] = -1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        sizes[id(node)] = 1 + sum(map(size, children))
        return sizes[id(node)]

    if size(root) - len(sizes) > MAX_VALUES:  # what aliases add beyond the values written
        # Name the largest top-level entry, where the alias chain ends.
        pairs = root.value if isinstance(root, yaml.MappingNode) else []
        key = max(pairs, key=lambda pair: size(pair[1]))[0] if pairs else root
        raise _Refused(
            f"'{getattr(key, 'value', '')}' expands to {size(root):,} values through aliases "
            f"(anchors & and aliases *); a recipe's aliases may add at most {MAX_VALUES:,}",
            key.start_mark,
        )


def load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The composed nodes (for line numbers) and the values of one YAML document, refused (a
    YAMLError) when it is too deep, too large through aliases or holds a number too long."""
    _check_depth(text)
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_expansion(root)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


def read_document(path: Path) -> Document:
    source = str(path)
    try:
        if path.is_dir():
            raise UserError(f"'{source}' is a directory, not a recipe file")
        if not path.is_file():
            raise UserError(f"recipe file '{source}' does not exist")
        data = path.read_bytes()
    except OSError as exc:  # a name too long, a loop of links, no permission
        raise UserError(f"recipe file '{source[:200]}' cannot be read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{source}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    try:
        root, raw = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        if "could not determine a constructor" in problem:
            problem = f"unsupported YAML tag {problem.split('tag ')[-1]}; recipes hold plain values only"
        if isinstance(exc, _Refused):
            raise UserError(f"{where}: not a recipe: {problem}") from None
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if root is None:
        raise UserError(f"{source}: the recipe file is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping of sections (model, data, train, ...)")
    duplicates = duplicate_keys(root, source)
    if duplicates:
        raise UserError("\n".join(duplicates))
    return Document(source, root, raw)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Child values over parent values; sections merge key by key, lists and scalars are replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def extends_target(extends: Any, child: Document) -> Path:
    line = line_of(child.root, ("extends",))
    if not isinstance(extends, str) or not extends:
        raise UserError(f"{child.source}:{line}: extends must name a recipe (e.g. extends: code-gen)")
    if extends.endswith((".yaml", ".yml")) or "/" in extends:
        return Path(child.source).parent / extends
    try:
        return find_recipe(extends)
    except UserError as exc:
        raise UserError(f"{child.source}:{line}: extends: {exc}") from None


def resolve(path: Path) -> tuple[dict[str, Any], list[Document]]:
    """The merged raw mapping of a recipe and its `extends` ancestors, and their documents (child first)."""
    documents: list[Document] = []
    chain: list[Path] = []
    while True:
        key = path.resolve()
        if key in chain:
            cycle = " -> ".join(str(p) for p in [*chain, key])
            raise UserError(f"{documents[0].source}: extends forms a cycle: {cycle}")
        document = read_document(path)
        chain.append(key)
        documents.append(document)
        if "extends" not in document.raw:
            break
        path = extends_target(document.raw["extends"], document)
        if not path.is_file():
            line = line_of(document.root, ("extends",))
            raise UserError(f"{document.source}:{line}: parent recipe '{path}' does not exist")
    raw: dict[str, Any] = {}
    for document in reversed(documents):
        raw = merge(raw, {k: v for k, v in document.raw.items() if k != "extends"})
    return raw, documents


def line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``path`` (or of its deepest existing parent)."""
    line = None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def node_at(root: yaml.Node, path: tuple[Any, ...]) -> yaml.Node | None:
    """The YAML node at ``path`` (list items by index; the last of a mapping's keys is the key's own
    node when ``path`` ends inside data.weights, whose keys are paths)."""
    node = root
    for depth, key in enumerate(path):
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if pair is None:
                return None
            last_key = depth == len(path) - 1 and tuple(path[:2]) == ("data", "weights")
            node = pair[0] if last_key else pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        elif isinstance(node, yaml.ScalarNode) and key == 0 and depth == len(path) - 1:
            return node  # `train: one.jsonl` is read as a list of one
        else:
            return None
    return node


def input_origin(
    path: tuple[Any, ...],
    documents: list[Document],
    overrides: dict[tuple[str, ...], str],
    paths_from: Path | None = None,
) -> tuple[str, Path]:
    """Who wrote the value at ``path`` ("file:line", or the override) and the folder its relative
    paths are read from: that file's (or ``paths_from``), or the current directory for an override."""
    for keys, text in overrides.items():
        if tuple(map(str, path[: len(keys)])) == keys:
            return f"override '{text}'", Path.cwd()
    # A list comes whole from one file, the first (child first) holding it; data.weights is merged
    # key by key, so each of its keys from the file that holds that key.
    held = path if tuple(path[:2]) == ("data", "weights") else path[:2]
    writer = next((d for d in documents if node_at(d.root, held) is not None), None)
    if writer is None:
        return value_source(path, documents, overrides), paths_from or Path.cwd()
    node = node_at(writer.root, path)
    line = node.start_mark.line + 1 if node is not None else line_of(writer.root, path)
    # The folder as the system opens it: ../ after a linked folder leads where `extends` does.
    return f"{writer.source}:{line}", paths_from or Path(writer.source).parent.resolve()


def value_source(
    path: tuple[Any, ...], documents: list[Document], overrides: dict[tuple[str, ...], str]
) -> str:
    """Where a value came from: the override that set it, or the file (and line) of the extends chain."""
    for keys, text in overrides.items():
        if tuple(map(str, path[: len(keys)])) == keys:
            return f"override '{text}'"
    if not documents:
        return "<recipe>"
    # The first document (child first) that holds the whole path wrote the value.
    for document in documents:
        node = document.root
        for key in path:
            if not isinstance(node, yaml.MappingNode):
                node = None
                break
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is None:
                break
        if node is not None:
            return f"{document.source}:{line_of(document.root, path)}"
    line = line_of(documents[0].root, path)
    return f"{documents[0].source}:{line}" if line else documents[0].source


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``train.max_steps=10`` -> (('train', 'max_steps'), 10); the value is read as YAML, then typed."""
    key, sep, value = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or len(keys) < 2 or not all(keys):
        raise UserError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=10)")
    try:
        parsed = load_yaml(value)[1] if value.strip() else None
    except _Refused as exc:
        raise UserError(f"override '{key}=...': {exc.problem}") from None
    except yaml.YAMLError:
        parsed = value  # not YAML: keep the text; the schema decides whether a string fits
    return keys, parsed


def apply_override(raw: dict[str, Any], keys: tuple[str, ...], value: Any, text: str) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{text}': '{key}' is a value, not a section")
    node[keys[-1]] = value
