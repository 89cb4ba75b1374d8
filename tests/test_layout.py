"""The package's shape: no module of finetune/ imports, directly or through others, one that imports it.

Imports inside functions count too: a lazy import that closes a circle (cli -> smoke -> cli, as it
once was) still means neither module can be understood, or moved, without the other.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def package_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """For each module of the package (subpackages included: finetune.plan.budget), the package's
    modules it imports anywhere in its text, lazy imports inside functions too."""
    paths = {module_name(path): path for path in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name):
                for alias in node.names:  # `from finetune.plan import budget` names a module
                    found.add(
                        f"{node.module}.{alias.name}"
                        if f"{node.module}.{alias.name}" in paths
                        else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(package.name + ".")}
        graph[name] = {m for m in found if m in paths} - {name}
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
    assert "finetune.train.training" in graph["finetune.lifecycle"]  # imported inside a function only
    assert "finetune.lifecycle" in graph["finetune.cli.smoke"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(package_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def stage(module: str) -> str:
    """finetune.plan.budget: plan; finetune.lifecycle: lifecycle."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


# The layering, as rules: X never imports Y (lazy imports count). The stages in the order a run
# uses them: base < recipe < models < data < plan < runs < train < export, evaluate < lifecycle < cli.
NEVER = {
    "base": {"recipe", "models", "data", "plan", "runs", "train", "export", "evaluate", "lifecycle", "cli"},
    "recipe": {"models", "data", "plan", "runs", "train", "export", "evaluate", "lifecycle", "cli"},
    "models": {"data", "plan", "runs", "train", "export", "evaluate", "lifecycle", "cli"},
    "data": {"plan", "runs", "train", "export", "evaluate", "lifecycle", "cli"},
    "plan": {"runs", "train", "export", "evaluate", "lifecycle", "cli"},
    "runs": {"train", "export", "evaluate", "lifecycle", "cli"},
    "train": {"export", "evaluate", "lifecycle", "cli"},
    "export": {"evaluate", "lifecycle", "cli"},
    "evaluate": {"export", "lifecycle", "cli"},
    "lifecycle": {"cli"},
}
HEAVY = ("torch", "unsloth", "transformers", "trl", "peft")


# The one crossing, and why: the merge itself runs on the training stack (train/inference.py), but
# what it merges into and the README it writes are decided in export/ before anything heavy.
CROSSINGS = {("finetune.train.inference", "finetune.export.merging")}


def layering_breaks(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {imported}"
        for module, imports in graph.items()
        for imported in imports
        if stage(imported) in NEVER.get(stage(module), ()) and (module, imported) not in CROSSINGS
    )


def test_the_layering_rule_sees_a_break():
    assert layering_breaks({"finetune.plan.budget": {"finetune.train.stack"}}) == [
        "finetune.plan.budget imports finetune.train.stack"
    ]
    assert layering_breaks({"finetune.train.stack": {"finetune.plan.budget"}}) == []


def test_each_stage_imports_only_the_stages_below_it():
    assert layering_breaks(package_imports()) == []


def test_recipe_data_plan_models_and_runs_never_import_a_heavy_library_at_import():
    """Importing any module of the light stages imports no heavy library: validation and prediction
    stay light. Inside functions a few do, each where it runs after the stack or in a child process
    (base/distributed.py's collectives, base/internals.py, models/tiny_model.py's builders,
    plan/device_speed.py's measurement in a child): tests/test_import_order.py checks those."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if stage(module_name(path)) not in ("base", "recipe", "models", "data", "plan", "runs"):
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{module_name(path)}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert found == []


def test_every_subpackage_says_what_it_owns():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if not any(folder.glob("*.py")):
            continue
        init = folder / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) if init.is_file() else None
        assert doc and "never imports" in doc, (
            f"{folder.name}/__init__.py: say what it owns and what it never imports"
        )


def test_no_two_test_files_share_a_name():
    """pytest imports test files by basename (rootdir-relative, no __init__.py): two files named alike
    in tests/ and tests/e2e/ stop the whole collection with 'import file mismatch', as CI once did."""
    tests = Path(__file__).resolve().parent
    names = [path.name for path in tests.rglob("test_*.py")]
    assert not {name for name in names if names.count(name) > 1}
