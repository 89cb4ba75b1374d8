"""Unsloth comes before what it patches, in every file of ours that trains or runs where training does.

Imported on a GPU, Unsloth replaces classes inside TRL (trl.SFTTrainer and trl.SFTConfig become
classes it generates: unsloth/models/rl.py, _patch_trl_rl_trainers), so a name bound by an earlier
`from trl import SFTTrainer` keeps TRL's own trainer; it warns when trl, transformers or peft came
first (unsloth/_gpu_init.py). The rule, read off the source of every .py in finetune/, benchmarks/,
tests/ and runner.py:

1. At a module's top level (module-level if and try blocks included), trl, transformers, peft and
   datasets are imported only after the stack is set up: unsloth itself, finetune.train.stack (which
   imports unsloth first on its backend, and on the transformers backend never does, by design), or
   a module of finetune/ whose own top level does that first (train, callbacks, inference). torch may
   come before: Unsloth imports it itself.
2. Inside a function, trl, transformers and peft are imported only where the module's top level set
   the stack up (a function runs after it) or the same function did so earlier, or the file is in
   FUNCTIONS_RUN_AFTER_THE_STACK_OR_WITHOUT_TRAINING, which says why that is right where it runs.
   datasets inside a function is fine anywhere: Unsloth patches only Dataset.map, on the class itself
   (unsloth_zoo/temporary_patches/misc.py), which reaches a datasets imported before it. (The runner
   does import it first when the data is not prepared yet: planning builds the store before the stack.)
3. tests/e2e/: its conftest.py imports finetune.train.stack before anything else, and pytest imports a
   conftest before the test modules under it, so all of them run after the stack.

Not seen: code run from strings (the tests' subprocess scripts) and importlib.import_module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHED = ("trl", "transformers", "peft")
TOP_LEVEL_ORDERED = (*PATCHED, "datasets")
E2E = ROOT / "tests" / "e2e"

FUNCTIONS_RUN_AFTER_THE_STACK_OR_WITHOUT_TRAINING = {
    "finetune/models/tiny_model.py": "its builders run in `python -m finetune.models.tiny_model` "
    "(the child of data.tokenize.llama3_tokenizer_dir, which trains nothing), in benchmarks' parent "
    "processes (which train nothing), or through ensure_tiny_model from train/training.py, "
    "train/inference.py and tests/e2e, all after the stack",
    "finetune/export/gguf_export.py": "the Modelfile's template rendering runs in write_gguf, called by "
    "export.merging.export_run after train.backend.inference_stack imported the stack",
    "benchmarks/gpu_truth.py": "builds the model the runs load in a process of its own (--build-model), "
    "which trains nothing; every measured run is a process of its own too",
    "benchmarks/prepare_speed.py": "times TRL's own data preparation, without Unsloth on purpose, in a "
    "process of its own that trains nothing",
}


def imported_modules(node: ast.AST) -> list[str]:
    """The dotted names an import statement imports (`from finetune import stack`: finetune.train.stack)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return []


def top_level_imports(tree: ast.AST) -> list[ast.stmt]:
    """The imports run when the module is imported (outside every function), in source order."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def outermost_functions(tree: ast.AST) -> list[ast.AST]:
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append(child)
            else:
                visit(child)

    visit(tree)
    return found


def sets_up(node: ast.AST, stack_first: frozenset[str]) -> bool:
    return any(m.split(".")[0] == "unsloth" or m in stack_first for m in imported_modules(node))


def imports_any(node: ast.AST, roots: tuple[str, ...]) -> bool:
    return any(m.split(".")[0] in roots for m in imported_modules(node))


def module_name(path: Path) -> str:
    """finetune/train/stack.py: finetune.train.stack."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def stack_first_modules(package: Path = ROOT / "finetune") -> frozenset[str]:
    """finetune.train.stack, and each module of finetune/ whose top level imports it (or unsloth, or such a
    module) before anything Unsloth patches."""
    trees = {module_name(path): ast.parse(path.read_text()) for path in package.rglob("*.py")}
    known = {"finetune.train.stack"}
    grew = True
    while grew:
        grew = False
        for name, tree in trees.items():
            for node in top_level_imports(tree) if name not in known else []:
                if sets_up(node, frozenset(known)):
                    known.add(name)
                    grew = True
                    break
                if imports_any(node, TOP_LEVEL_ORDERED):
                    break
    return frozenset(known)


def order_problems(text: str, stack_first: frozenset[str], set_up: bool = False) -> list[tuple]:
    """(line, module, function or None) of each import in ``text`` of what Unsloth patches before the
    stack is set up; ``set_up``: the process set it up before this file runs (tests/e2e/conftest.py)."""
    tree = ast.parse(text)
    problems = []
    ready = set_up
    for node in top_level_imports(tree):
        if sets_up(node, stack_first):
            ready = True
        elif imports_any(node, TOP_LEVEL_ORDERED) and not ready:
            problems.append((node.lineno, imported_modules(node)[0], None))
    for function in outermost_functions(tree):
        inside = ready
        imports = [n for n in ast.walk(function) if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in sorted(imports, key=lambda n: (n.lineno, n.col_offset)):
            if sets_up(node, stack_first):
                inside = True
            elif imports_any(node, PATCHED) and not inside:
                problems.append((node.lineno, imported_modules(node)[0], function.name))
    return problems


def described(name: str, problem: tuple) -> str:
    line, module, function = problem
    where = f"in {function}(), with nothing setting the stack up before it" if function else "before unsloth"
    return f"{name}:{line}: {module} {where}"


def python_files() -> list[Path]:
    folders = [ROOT / "finetune", ROOT / "benchmarks"]
    return [
        ROOT / "runner.py",
        *(p for f in folders for p in sorted(f.rglob("*.py"))),
        *sorted(ROOT.glob("tests/**/*.py")),
    ]


STACK_FIRST = stack_first_modules()

# benchmarks/bare_unsloth.py as it was: TRL's SFTTrainer bound before Unsloth could replace it.
OLD_BARE_UNSLOTH = """
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel
"""


def test_the_rule_refuses_the_old_bare_script_and_a_function_that_imports_trl_unprepared():
    assert order_problems(OLD_BARE_UNSLOTH, STACK_FIRST) == [
        (3, "datasets", None),
        (4, "transformers", None),
        (5, "trl", None),
    ]
    reordered = "import torch\nfrom unsloth import FastLanguageModel\nfrom trl import SFTTrainer\n"
    assert order_problems(reordered, STACK_FIRST) == []
    lazy = "def f():\n    from trl import SFTTrainer\n"
    assert order_problems(lazy, STACK_FIRST) == [(2, "trl", "f")]
    assert order_problems(lazy, STACK_FIRST, set_up=True) == []
    assert (
        order_problems("def f():\n    from finetune.train import stack\n    import peft\n", STACK_FIRST) == []
    )
    assert order_problems("from finetune.train import training\n" + lazy, STACK_FIRST) == []
    assert order_problems("def f():\n    import datasets\n", STACK_FIRST) == []
    in_if = "import os\nif os.environ:\n    import unsloth\nfrom transformers import AutoModel\n"
    assert order_problems(in_if, STACK_FIRST) == []


def test_the_modules_that_set_the_stack_up_are_found_through_the_ones_they_import():
    assert {
        "finetune.train.stack",
        "finetune.train.training",
        "finetune.train.callbacks",
        "finetune.train.inference",
    } <= STACK_FIRST
    assert "finetune.plan.job" not in STACK_FIRST  # imports the stack inside functions only
    assert "finetune.data.store" not in STACK_FIRST and "finetune.models.tiny_model" not in STACK_FIRST


def test_every_file_imports_unsloth_before_what_it_patches():
    problems = []
    for path in python_files():
        name = path.relative_to(ROOT).as_posix()
        found = order_problems(path.read_text(), STACK_FIRST, set_up=E2E in path.parents)
        if name in FUNCTIONS_RUN_AFTER_THE_STACK_OR_WITHOUT_TRAINING:
            found = [problem for problem in found if problem[2] is None]
        problems += [described(name, problem) for problem in found]
    assert not problems, "\n".join(problems)


def test_the_end_to_end_tier_sets_the_stack_up_before_anything_else():
    first = top_level_imports(ast.parse((E2E / "conftest.py").read_text()))[0]
    assert imported_modules(first) == ["finetune.train.stack"]


def test_each_exception_is_still_needed():
    """An exception whose file no longer imports trl, transformers or peft in a function is removed."""
    for name in FUNCTIONS_RUN_AFTER_THE_STACK_OR_WITHOUT_TRAINING:
        found = order_problems((ROOT / name).read_text(), STACK_FIRST)
        assert found and all(function is not None for _, _, function in found), name
