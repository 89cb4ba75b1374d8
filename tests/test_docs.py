"""The README and docs/: short enough for a newcomer, every page indexed and every link sound, and no
figure quoted from a command that the command no longer prints.

The quoted outputs are written by `make docs` (benchmarks/docs_figures.py) between marker comments;
here the light ones are rerun (`plan` in a subprocess, no torch in this process) and compared line
for line, with what varies from run to run masked (docs_figures.NORMALISE). When one fails, run
`make docs` and commit what it changed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "benchmarks" / "docs_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)
figures.PYTHON = sys.executable  # the interpreter running the tests runs the commands too

LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_readme_is_under_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move the detail into a page of docs/"


def test_every_docs_page_is_in_the_readme_index_and_every_indexed_page_exists():
    linked = {Path(target.split("#")[0]) for target in LINK.findall(README.read_text())}
    linked_docs = {p for p in linked if p.parts[:1] == ("docs",) and p.suffix == ".md"}
    missing = sorted(str(p) for p in linked_docs if not (ROOT / p).is_file())
    assert not missing, f"README.md links pages that do not exist: {missing}"
    unindexed = sorted(
        str(p.relative_to(ROOT)) for p in DOCS.glob("*.md") if p.relative_to(ROOT) not in linked
    )
    assert not unindexed, f"pages of docs/ missing from README.md's index: {unindexed}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def smoke_plan() -> list[str]:
    return figures.plan_lines(["recipes/smoke.yaml"])


def test_the_readme_demo_output_holds_what_plan_prints_today():
    """The demo prints the plan before training: the README's copy must hold today's plan, line for
    line (measured speeds, free disk and the machine's RAM masked), in one piece."""
    demo = figures.normalise(figures.block(README, "demo-output"))
    plan = figures.normalise(smoke_plan())
    warnings = [line for line in plan if line.startswith("warning: ")]
    plan = [line for line in plan if line not in warnings]
    assert len(plan) > 10, plan
    assert [line for line in demo if line.startswith("warning: ")] == warnings, "the demo's warnings differ"
    starts = [i for i in range(len(demo) - len(plan) + 1) if demo[i : i + len(plan)] == plan]
    if not starts:
        missing = [line for line in plan if line not in demo]
        pytest.fail(
            "README.md's demo output is not what `plan recipes/smoke.yaml` prints today: run `make docs`.\n"
            + (
                "lines plan prints that the README lacks:\n" + "\n".join(missing)
                if missing
                else "order differs"
            )
        )
    steps = int(re.search(r"(\d+) optimizer steps", "\n".join(plan)).group(1))
    assert any(line.startswith(f"Done: {steps} steps in ") for line in demo), (
        "the demo's last line is missing"
    )
    assert any(re.match(rf"^step +{steps}/{steps} ", line) for line in demo), "the last step line is missing"


def test_the_demo_seconds_were_measured():
    seconds = re.search(
        r"<!-- demo-seconds:start -->(\d+) s on \d+ CPU cores \(load average [\d.]+\)"
        r"<!-- demo-seconds:end -->",
        README.read_text(),
    )
    assert seconds and int(seconds.group(1)) > 0, "run `make docs`"


@pytest.mark.parametrize("name", sorted(figures.PLAN_BLOCKS))
def test_each_quoted_plan_is_what_plan_prints_today(name):
    page, args = figures.PLAN_BLOCKS[name]
    quoted = figures.block(ROOT / page, name)
    assert figures.normalise(quoted) == figures.normalise(figures.plan_lines(args)), (
        f"{page}'s {name} is not what `{figures.plan_command(args)}` prints today: run `make docs`"
    )


@pytest.mark.slow
def test_the_recipe_table_is_what_plan_predicts_today_for_every_shipped_recipe():
    table = figures.block(README, "recipe-table")
    fresh = figures.recipe_rows()
    assert figures.normalise(table) == figures.normalise(fresh), (
        "README.md's recipe table is stale: run `make docs`"
    )
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped == set(figures.RECIPE_GPU), "a recipe was added or removed: give it a card in RECIPE_GPU"


def test_the_export_and_eval_outputs_come_from_the_demo_run_quoted():
    """Too heavy to rerun here; they must at least be from the same `make docs` run as the demo."""
    run_dir = re.search(r"adapter saved to (\S+)/adapter", "\n".join(figures.block(README, "demo-output")))
    assert run_dir, "README.md's demo output has no run folder: run `make docs`"
    for page, name, said in [
        ("docs/export.md", "export-gguf", "GGUF saved to"),
        ("docs/evaluation.md", "eval-smoke", "HumanEval: 164 tasks"),
    ]:
        text = "\n".join(figures.block(ROOT / page, name))
        assert said in text, f"{page}: {name} is empty: run `make docs`"
        assert run_dir.group(1) in text, f"{page}: {name} is not from the README's demo run: run `make docs`"


def test_the_isolation_line_quoted_is_what_a_confined_eval_prints_now():
    """docs/evaluation.md's eval output was made confined (as root, as in CI): its isolation line
    must be the one the sandbox prints for that path today, not an older promise."""
    from finetune.base import sandbox

    lines = figures.block(ROOT / "docs/evaluation.md", "eval-smoke")
    assert f"isolation: {sandbox.CONFINED}" in lines, (
        "docs/evaluation.md's isolation line is stale: run `make docs`"
    )


def test_the_chaos_figure_quoted_is_the_one_make_chaos_wrote():
    """docs/runs.md quotes the last `make chaos` from the results file it wrote, not from memory."""
    document = json.loads(figures.CHAOS_RESULTS.read_text())
    assert figures.block(DOCS / "runs.md", "chaos") == figures.chaos_lines(document)


def test_the_first_recipe_walkthrough_is_what_its_commands_print():
    """The README's walkthrough ran as it says: its copy and diff are what they print today (rerun
    here: light verbs), its Ctrl-C said how to resume, the resume continued that run from where it
    stopped to the edited max_steps, and export and generate used that same run."""
    text = README.read_text()
    match = re.search(
        r"<!-- first-recipe:start -->\n(`{3,})\n(.*?)\n\1\n<!-- first-recipe:end -->", text, re.S
    )
    assert match, "README.md has no first-recipe block: run `make docs`"
    shown = match.group(2).splitlines()
    with figures.first_recipe_room():  # a reader's own my-recipe.yaml is kept aside, then put back
        cheap = figures.first_recipe_cheap()
    assert shown[: len(cheap)] == cheap, "the walkthrough's copy and diff changed: run `make docs`"
    commands = [line for line in shown if line.startswith("$ ")]
    assert [c.split()[3] for c in commands] == [
        "copy",
        "diff",
        "my-recipe.yaml",
        "resume",
        "export",
        "generate",
    ]
    stopped = next(line for line in shown if "stopped after step" in line)
    at = int(re.search(r"after step (\d+)", stopped).group(1))
    run_dir = re.search(r"resume (runs/my-recipe/\S+)", stopped).group(1)
    assert all(run_dir in command for command in commands[3:]), commands
    assert shown[shown.index(commands[3]) + 1].startswith(f"step {at + 1:>5}/20 ")  # from where it stopped
    assert any(line.startswith(f"Done: 20 steps (from step {at} on in this process) in ") for line in shown)
    assert f"merged 16-bit model saved to {run_dir}/merged" in shown
