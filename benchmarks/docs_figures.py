"""Write the figures the docs quote from a run into them, between marker comments, so none is typed
by hand:

    make docs        # or: .venv/bin/python benchmarks/docs_figures.py

Each block sits in a page between `<!-- NAME:start -->` and `<!-- NAME:end -->` and is replaced whole:

- demo-output (README.md): what `make demo` prints, from a real run of it (the 28 middle step lines
  elided); demo-seconds: that run's wall-clock time;
- recipe-table (README.md): every shipped recipe planned at full length on the card it is meant for;
- plan-code-gen-4090 (docs/budgets.md), plan-code-gen-2-gpus (docs/several-gpus.md): `plan` output;
- first-recipe (README.md): the walkthrough of a first own recipe, each step run as it says
  (my-recipe.yaml at the checkout's top, removed after with its runs; Ctrl-C is a SIGINT after step 8);
- export-gguf (docs/export.md) and eval-smoke (docs/evaluation.md): `export --format gguf` and `eval` of
  the demo's run;
- chaos (docs/runs.md): the last `make chaos`, from the results it wrote (benchmarks/results/chaos.json;
  too long to rerun here, so it is quoted from that file, and tests/test_docs.py holds the two equal).

tests/test_docs.py imports this file (it imports no torch) and checks every block that a light command
gives (`plan`, the recipe table) against a fresh run of it, comparing the lines that do not vary from
run to run (NORMALISE masks what does: measured speeds, free disk, the machine's RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("DOCS_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# What legitimately differs between two runs of the same command: masked before comparing.
NORMALISE = [
    # the CPU's speed is measured each time (numpy matmul and copy)
    (r"^(time: )[\d.]+( s per optimizer step \(\+/-15%\), )[\d.]+( min in all)", r"\1#\2#\3"),
    (r"^(  \(CPU: )[\d.]+( TFLOP/s, )[\d.]+( GB/s)", r"\1#\2#\3"),
    # the CPU's memory limit is this machine's RAM
    (r"^(PASS|FAIL)( peak memory \(\+10%\) on CPU: [\d.]+ GiB \(limit )[\d.]+", r"\1\2#"),
    # free disk space, and what the run's disk adds up to with or without the base model's download
    (r"^(PASS|FAIL)( disk in runs \(the run's files[^)]*\): )[\d.]+", r"\1\2#"),
    (r"\(free [\d.]+ GiB\)", "(free # GiB)"),
    (r"\(free after training [\d.]+ GiB;", "(free after training # GiB;"),
    (r"; [\d.]+ GiB will be free after training", "; # GiB will be free after training"),
    # GRPO's tests reward: the sandbox's cost per program is measured by every plan, and is in the
    # step time (so is the GPU step time of the recipe table's GRPO rows)
    (r"their tests: \d+ ms a program", "their tests: # ms a program"),
    (r"^(\| \[`code-grpo\.yaml`\].*: [\d.]+ GiB, )[\d.]+( s \()", r"\1#\2"),
]
# Lines that appear only on some machines (the base model already downloaded or not).
OPTIONAL = [r"^  base model download \(Hugging Face cache\)"]


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if any(re.search(p, line) for p in OPTIONAL):
            continue
        for pattern, repl in NORMALISE:
            line = re.sub(pattern, repl, line)
        # "(the run's files and the base model's download)" when the model is not in the cache yet
        line = line.replace(" (the run's files and the base model's download):", " (the run's files):")
        out.append(line.rstrip())
    return out


def run(args: list[str], *, check: bool = True, cwd: Path = ROOT) -> tuple[str, str, float]:
    """A runner.py command's stdout and stderr, and its wall-clock seconds."""
    start = time.monotonic()
    done = subprocess.run(
        [PYTHON, str(ROOT / "runner.py"), *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )
    seconds = time.monotonic() - start
    if check and done.returncode != 0:
        sys.exit(f"runner.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, done.stderr, seconds


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def plan_lines(args: list[str]) -> list[str]:
    """What `runner.py plan ARGS` prints (its warnings first), less the plot's file name."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, _ = run(["plan", *args, "--png", str(Path(tmp) / "lr.png")])
    return warnings_of(err) + [line for line in out.splitlines() if not line.startswith("plot: ")]


# --- the recipe table ---------------------------------------------------------------------------

# The card each recipe is meant for: the table plans it there at full length (every micro-batch at
# max_seq_length), so the figures are the worst case and do not depend on this machine.
RECIPE_GPU = {
    "smoke": None,  # the CPU
    "code-gen": "rtx-4090",
    "instruct-alpaca": "rtx-4090",
    "code-gen-16k": "rtx-4090",
    "code-gen-80gb": "h100",
    "llama-3.2-1b": "rtx-4090",
    "llama-3.2-3b": "rtx-4090",
    "llama-3.1-70b": "h100",
    "code-dpo": "rtx-4090",
    "code-orpo": "rtx-4090",
    "code-grpo": "rtx-4090",
}
GPU_NAME = {"rtx-4090": "RTX 4090", "h100": "H100"}


def resolved(path: Path) -> dict:
    """A recipe as `runner.py show` resolves it (extends followed, defaults filled in)."""
    import yaml  # light; the recipes' own reader

    out, _, _ = run(["show", str(path)])
    return yaml.safe_load(out)


def recipe_rows() -> list[str]:
    rows = [
        "| recipe | what it is for | model | trainable parameters | predicted peak memory, time per step "
        "(full length) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, gpu in RECIPE_GPU.items():
            path = ROOT / "recipes" / f"{name}.yaml"
            args = ["plan", str(path), "--json", "--png", str(Path(tmp) / "lr.png")]
            if gpu:
                args += ["--gpu", gpu, "--full-length"]
            # The disk check depends on this machine's free space (the 70B's download is 37 GiB):
            # a refusal for disk alone still has the figures the table quotes.
            out, err, _ = run(args, check=False)  # a refused plan still prints its JSON
            plan = json.loads(out) if out.strip() else {}
            if not plan or not all(v["ok"] for v in plan["budget"]["verdicts"]):
                sys.exit(f"runner.py {' '.join(args)} was refused:\n{err[-3000:]}")
            budget, params = plan["budget"], plan["parameters"]
            gib = budget["memory_total_bytes"] / 2**30
            share = f" ({100 * params['trainable'] / params['total']:.2f}%)"
            recipe = resolved(path)
            if gpu:
                seq = f"{plan['effective_batch_size']} x {recipe['model']['max_seq_length']} tokens"
                figures = f"{GPU_NAME[gpu]}: {gib:.1f} GiB, {budget['step_seconds']:.3g} s ({seq})"
            else:
                figures = f"CPU: {gib:.2f} GiB (time: see the demo above)"
            rows.append(
                f"| [`{name}.yaml`](recipes/{name}.yaml) | {recipe['description']} "
                f"| `{recipe['model']['name']}` | {params['trainable']:,}{share} | {figures} |"
            )
    return rows


# --- the blocks -----------------------------------------------------------------------------------

PLAN_BLOCKS = {
    # name: (page, plan arguments)
    "plan-code-gen-4090": ("docs/budgets.md", ["recipes/code-gen.yaml", "--gpu", "rtx-4090"]),
    "plan-code-gen-2-gpus": (
        "docs/several-gpus.md",
        ["recipes/code-gen.yaml", "--gpus", "2", "--gpu", "rtx-4090"],
    ),
    "plan-code-dpo-4090": ("docs/preference.md", ["recipes/code-dpo.yaml", "--gpu", "rtx-4090"]),
    "plan-code-grpo-4090": ("docs/grpo.md", ["recipes/code-grpo.yaml", "--gpu", "rtx-4090"]),
}


def fenced(command: str | None, lines: list[str]) -> list[str]:
    # A fence longer than any run of backticks the output starts a line with (a model's answer
    # may open a code block of its own), so the output cannot close it.
    longest = max((len(line) - len(line.lstrip("`")) for line in lines), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, *([f"$ {command}"] if command else []), *lines, fence]


def plan_command(args: list[str]) -> str:
    return "python runner.py plan " + " ".join(args)


def demo() -> tuple[list[str], float, str]:
    """`make demo`'s output (warnings first, as a terminal shows them), its seconds, its run folder."""
    out, err, seconds = run(["recipes/smoke.yaml"])
    lines = out.splitlines()
    lines = _elided(lines)  # the first and the last step, the ones between elided
    match = re.search(r"adapter saved to (\S+)/adapter", out)
    if not match:
        sys.exit("the demo did not say where it saved its adapter")
    return warnings_of(err) + lines, seconds, match.group(1)


# The smoke recipe evaluated on other rows at a learning rate that overfits the tiny model: its
# eval loss turns up and early stopping ends the run (tests/e2e/test_early_stopping_run.py runs it).
EARLY_STOPPING = [
    "recipes/smoke.yaml",
    "data.eval=data_samples/code_alpaca.jsonl",
    "train.eval_steps=2",
    "train.early_stopping_patience=2",
    "train.max_steps=20",
    "train.learning_rate=5e-2",
    "train.save_total_limit=2",
    "output.samples=0",
]


# The smoke recipe tuned with DPO on the code preference pairs, and killed/resumed in the tests
# (tests/e2e/test_preference_run.py runs it; docs/preference.md quotes what it prints).
DPO_RUN = [
    "recipes/smoke.yaml",
    "train.method=dpo",
    "data.train=data_samples/code_preference.jsonl",
    "train.max_steps=8",
    "train.save_steps=4",
    "output.samples=0",
]


def audit_pairs_lines() -> list[str]:
    """The audit's line about code-dpo's pairs (`runner.py data recipes/code-dpo.yaml`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, _, _ = run(["data", "recipes/code-dpo.yaml", "--show", "0", "--png", str(Path(tmp) / "h.png")])
    return [line for line in out.splitlines() if line.startswith("pairs: ")]


def preference_run_lines(out: str) -> list[str]:
    """What a preference run says of its training (the lines that do not vary on this CPU): the
    loss and the rewards."""
    return [line for line in out.splitlines() if line.startswith(("train loss:", "rewards ("))]


def early_stopping_lines(out: str) -> list[str]:
    """What a run with early stopping says of it: each evaluation, and the best checkpoint and the
    stop (the lines that do not vary from run to run on this CPU)."""
    keep = ("eval loss:", "best checkpoint:", "early stopping")
    return [line for line in out.splitlines() if "eval_loss" in line or line.startswith(keep)]


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def same_within(quoted: list[str], fresh: list[str], tolerance: float = 0.01) -> bool:
    """Whether two runs' lines say the same, their numbers within ``tolerance`` of each other
    (relative): a CPU with bfloat16 (AMX) and one without compute the tiny model's losses a little
    differently; the steps, the best one and the stop must be the same."""
    if len(quoted) != len(fresh) or [NUMBER.sub("#", q) for q in quoted] != [
        NUMBER.sub("#", f) for f in fresh
    ]:
        return False
    pairs = [
        (float(a), float(b))
        for q, f in zip(quoted, fresh, strict=True)
        for a, b in zip(NUMBER.findall(q), NUMBER.findall(f), strict=True)
    ]
    return all(abs(a - b) <= tolerance * max(abs(a), abs(b)) for a, b in pairs)


def replace_block(page: Path, name: str, lines: list[str]) -> None:
    lines = [line.replace(str(Path.home()), "~") for line in lines]
    text = page.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        sys.exit(f"{page.relative_to(ROOT)} has no {start} ... {end}")
    inline = "\n" not in pattern.search(text).group(0)
    body = start + ("".join(lines) if inline else "\n" + "\n".join(lines) + "\n") + end
    page.write_text(pattern.sub(lambda _: body, text, count=1))
    print(f"{page.relative_to(ROOT)}: {name} ({len(lines)} lines)")


def block(page: Path, name: str) -> list[str]:
    """The lines between a page's markers (the fences and the `$ command` line left out)."""
    match = re.search(
        rf"<!-- {re.escape(name)}:start -->(.*?)<!-- {re.escape(name)}:end -->", page.read_text(), re.S
    )
    if not match:
        raise LookupError(f"{page.name} has no {name} block")
    return [line for line in match.group(1).strip("\n").splitlines() if not line.startswith(("```", "$ "))]


# --- the README's first own recipe, run as it says -----------------------------------------------

FIRST = "my-recipe.yaml"  # the name the README's walkthrough uses, made at the checkout's top
FIRST_EDITS = {  # step 2's edits: other data (Alpaca rows, not chat), fewer steps
    "  train: data_samples/code_chat.jsonl\n": "  train: data_samples/code_alpaca.jsonl\n",
    "  max_steps: 30\n": "  max_steps: 20\n",
}
STOP_AFTER = 8  # Ctrl-C once this step's line is printed
FIRST_PROMPT = "Reverse a list in Python."


def first_recipe_cheap() -> list[str]:
    """Steps 1 and 2 of the walkthrough (copy, edit, diff) as a terminal shows them: light verbs,
    which tests/test_docs.py reruns. The recipe is left in place for the training steps;
    the caller's first_recipe_room() removes it."""
    recipe = ROOT / FIRST
    if recipe.exists() or recipe.is_symlink():
        sys.exit(f"{FIRST} is still at the checkout's top; first_recipe_room() keeps it aside")
    out, _, _ = run(["copy", "smoke", FIRST])
    lines = [f"$ python runner.py copy smoke {FIRST}", *out.splitlines()]
    text = recipe.read_text()
    for old, new in FIRST_EDITS.items():
        if old not in text:
            sys.exit(f"the copy of smoke has no line '{old.strip()}' to edit")
        text = text.replace(old, new)
    recipe.write_text(text)
    out, _, _ = run(["diff", FIRST])
    return lines + [f"$ python runner.py diff {FIRST}", *out.splitlines()]


KEPT = ROOT / f"{FIRST}.kept-aside-by-make-docs"  # a reader's own my-recipe.yaml, while the steps run


@contextmanager
def first_recipe_room():
    """Room for the walkthrough at the checkout's top: a my-recipe.yaml already there (the README
    has its reader make one) is kept aside and put back after, and the walkthrough's recipe and the
    run folders it made (none that were there before) are removed."""
    recipe, runs = ROOT / FIRST, ROOT / "runs" / Path(FIRST).stem
    if KEPT.exists():
        sys.exit(f"{KEPT.name} is at the checkout's top (an earlier walkthrough was stopped): rename it back")
    before = set(runs.glob("*"))
    kept = recipe.exists() or recipe.is_symlink()
    if kept:
        recipe.rename(KEPT)
    try:
        yield
    finally:
        recipe.unlink(missing_ok=True)
        if kept:
            KEPT.rename(recipe)
        for folder in set(runs.glob("*")) - before:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        if runs.is_dir() and not any(runs.iterdir()):
            runs.rmdir()


def first_recipe() -> list[str]:
    """The README's walkthrough, every step run as it says: copy, edit, train with a Ctrl-C, resume,
    export, generate; each command and what it printed, as one terminal session (the plan each
    training run prints first, and the step lines between the first and the last, elided)."""
    with first_recipe_room(), tempfile.TemporaryFile("w+") as stderr:
        lines = first_recipe_cheap()
        # stderr to a file: a pipe read only after stdout's end would stall a run that says much there
        train = subprocess.Popen(
            [PYTHON, str(ROOT / "runner.py"), FIRST],
            cwd=ROOT,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        printed = []
        for line in train.stdout:
            printed.append(line.rstrip("\n"))
            if re.match(rf"^step +{STOP_AFTER}/", line):
                train.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = train.wait()
        stderr.seek(0)
        err = stderr.read()
        if code != 130:
            sys.exit(f"the walkthrough's Ctrl-C did not stop the run with exit 130:\n{err[-3000:]}")
        said = [line for line in err.splitlines() if "stopped after step" in line]
        match = re.search(r"python runner.py resume (\S+)", " ".join(said))
        if not match:
            sys.exit(f"the interrupted run did not say how to resume it:\n{err[-3000:]}")
        run_dir = match.group(1)
        lines += [f"$ python runner.py {FIRST}", *_steps_on(printed), "^C", *said]
        out, _, _ = run(["resume", run_dir])
        lines += [f"$ python runner.py resume {run_dir}", *_steps_on(out.splitlines())]
        out, err, _ = run(["export", run_dir])
        lines += [f"$ python runner.py export {run_dir}", *warnings_of(err), *out.splitlines()]
        out, _, _ = run(["generate", run_dir, "--prompt", FIRST_PROMPT, "--max-new-tokens", "16"])
        lines += [f'$ python runner.py generate {run_dir} --prompt "{FIRST_PROMPT}" --max-new-tokens 16']
        return lines + out.splitlines()


def _steps_on(lines: list[str]) -> list[str]:
    """A training run's lines from its first step on (the plan it prints first is the demo's, in the
    README above), the steps between the first and the last elided."""
    first = next((i for i, line in enumerate(lines) if re.match(r"^step +\d+/\d+ ", line)), 0)
    return _elided(lines[first:])


def _elided(lines: list[str]) -> list[str]:
    """Lines with the step lines between the first and the last replaced by '...'."""
    steps = [i for i, line in enumerate(lines) if re.match(r"^step +\d+/\d+ ", line)]
    if len(steps) > 2:
        return lines[: steps[0] + 1] + ["..."] + lines[steps[-1] :]
    return lines


CHAOS_RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"


def chaos_lines(document: dict) -> list[str]:
    """The last `make chaos` in words: how many kills recovered exactly, what was left behind, where
    the kills landed and how each was recovered."""
    results = document["results"]
    exact = sum(r["exact"] for r in results)
    debris = sum(len(r["left_behind"]) for r in results)
    landed: dict[str, int] = {}
    recovered: dict[str, int] = {}
    for r in results:
        landed[r["killed_during"]] = landed.get(r["killed_during"], 0) + 1
        way = {"resume": "`resume`", "rerun": "running the command again"}[r["recovery"].split()[0]]
        recovered[way] = recovered.get(way, 0) + 1
    where = ", ".join(f"{n} during {phase}" for phase, n in landed.items())
    how = ", ".join(f"{n} by {way}" for way, n in sorted(recovered.items(), key=lambda kv: -kv[1]))
    minutes, seconds = divmod(document["seconds"], 60)
    return [
        f"Last run {document['date']} on {document['cpu_count']} CPU cores, seed {document['seed']}, "
        f"{minutes} min {seconds} s: **{exact} of {len(results)} kills recovered exactly**, "
        f"{debris} item{'s' if debris != 1 else ''} left behind. The kills landed {where}; "
        f"recovered {how}.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true", help="only the blocks that need no training")
    options = parser.parse_args()

    for name, (page, args) in PLAN_BLOCKS.items():
        replace_block(ROOT / page, name, fenced(plan_command(args), plan_lines(args)))
    replace_block(ROOT / "README.md", "recipe-table", recipe_rows())
    replace_block(ROOT / "docs/preference.md", "audit-code-dpo", fenced(None, audit_pairs_lines()))
    if CHAOS_RESULTS.is_file():
        replace_block(ROOT / "docs/runs.md", "chaos", chaos_lines(json.loads(CHAOS_RESULTS.read_text())))
    if options.no_demo:
        return 0

    load = os.getloadavg()[0]  # other work on the machine slows the demo: say how much there was
    lines, seconds, run_dir = demo()
    replace_block(ROOT / "README.md", "demo-output", fenced(None, lines))
    replace_block(
        ROOT / "README.md",
        "demo-seconds",
        [f"{seconds:.0f} s on {os.cpu_count()} CPU cores (load average {load:.1f})"],
    )

    replace_block(ROOT / "README.md", "first-recipe", fenced(None, first_recipe()))
    with tempfile.TemporaryDirectory() as out_dir:
        out, _, _ = run([*EARLY_STOPPING, f"output.dir={out_dir}"])
    command = "python runner.py " + " ".join(EARLY_STOPPING)
    replace_block(
        ROOT / "docs/recipes-and-data.md", "early-stopping", fenced(command, early_stopping_lines(out))
    )

    with tempfile.TemporaryDirectory() as out_dir:
        out, _, _ = run([*DPO_RUN, f"output.dir={out_dir}"])
    command = "python runner.py " + " ".join(DPO_RUN)
    replace_block(ROOT / "docs/preference.md", "dpo-run", fenced(command, preference_run_lines(out)))

    rel = os.path.relpath(run_dir, ROOT)
    out, err, _ = run(["export", rel, "--format", "gguf"])
    replace_block(
        ROOT / "docs/export.md",
        "export-gguf",
        fenced(f"python runner.py export {rel} --format gguf", warnings_of(err) + out.splitlines()),
    )
    out, err, _ = run(["eval", rel, "--allow-code-execution", "--max-new-tokens", "32"])
    replace_block(
        ROOT / "docs/evaluation.md",
        "eval-smoke",
        fenced(
            f"python runner.py eval {rel} --allow-code-execution --max-new-tokens 32",
            warnings_of(err) + out.splitlines(),
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
