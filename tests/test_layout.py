"""The package's shape: no module of finetune/ imports, directly or through others, one that imports it.

Imports inside functions count too: a lazy import that closes a circle (cli -> smoke -> cli, as it
once was) still means neither module can be understood, or moved, without the other.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def package_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """For each module of the package, the package's modules it imports anywhere in its text."""
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == package.name:
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name + "."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
        graph[path.stem] = found - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the list of modules along it (first == last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state:
                found = visit(imported, [*path, imported])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_lazy_imports():
    graph = package_imports()
    assert "inference" in graph["launch"] and "train" in graph["launch"]  # imported inside functions only
    assert "launch" in graph["smoke"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(package_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_modules_stay_short_enough_to_read():
    """The command line only parses, calls and presents; train.py only loads, adds LoRA, trains and
    saves; and no module grows past what one sitting can read."""
    lines = {path.stem: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert lines["cli"] < 350 and lines["train"] < 450
    assert not {name: n for name, n in lines.items() if n > 650}


def test_no_two_test_files_share_a_name():
    """pytest imports test files by basename (rootdir-relative, no __init__.py): two files named alike
    in tests/ and tests/e2e/ stop the whole collection with 'import file mismatch', as CI once did."""
    tests = Path(__file__).resolve().parent
    names = [path.name for path in tests.rglob("test_*.py")]
    assert not {name for name in names if names.count(name) > 1}
