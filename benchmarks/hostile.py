"""A hostile set of our own: what an attacker or a careless user hands the runner, each case one
command line, classified by what came back.

    .venv/bin/python benchmarks/hostile.py [--run RUN_DIR] [--json FILE] [-k WORD]

- traceback: a Python traceback on stderr, or an exit status that is neither the expected one nor 2
  (a crash, a signal);
- hang: longer than HANG_SECONDS (killed at KILL_SECONDS);
- wrong: the expected exit status not given, or the sentence it must say not said;
- held: the expected exit status, one sentence saying what it must, in time.

Cases that damage a run folder need a finished run: --run names one (`make demo` leaves one under
runs/smoke/), else one is trained first (2 steps of the smoke recipe, about a minute). Each case
gets a copy of it. tests/test_hostile.py runs the cases that need no run in-process (fast tier), and
tests/e2e/test_hostile_runs.py those that do, on a shared trained run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
HANG_SECONDS = 15.0  # a cold start of the runner with the tokenizer is a few seconds on 2 cores
KILL_SECONDS = 180.0
RUN_SECONDS = 120.0  # a case on a run may load the model and train its last steps
SMOKE = "recipes/smoke.yaml"
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # data, recipe, run, store, completions, flags, template, schedule
    make: Callable[..., list[str]]  # (folder[, run_dir]) -> the command line after runner.py
    expect: int = 2  # -1: 0 (the damage does not matter to this verb) or 2 saying ``say``
    say: str = ""  # a fragment the message (stderr) or, for exit 0, the output must hold
    needs_run: bool = False


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    return path


def _data(name: str, data: str | bytes, verb: str = "plan") -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        path = _write(folder / name, data)
        return [verb, SMOKE, f"data.train={path}"]

    return make


def _recipe(text: str, *overrides: str, verb: str = "validate") -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        return [verb, str(_write(folder / "hostile.yaml", text)), *overrides]

    return make


def _smoke(*args: str, verb: str = "plan") -> Callable[[Path], list[str]]:
    return lambda folder: [verb, SMOKE, *(a.replace("{folder}", str(folder)) for a in args)]


def _random_rows(count: int) -> bytes:
    """Rows that do not compress away, so that cutting their .gz cuts the data."""
    rows = []
    for _ in range(count):
        text = os.urandom(32).hex()
        rows.append(
            json.dumps(
                {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}
            )
        )
    return ("\n".join(rows) + "\n").encode()


def _deep_json(depth: int) -> str:
    return '{"messages": ' + "[" * depth + "]" * depth + "}\n"


def _fifo(folder: Path) -> list[str]:
    os.mkfifo(folder / "data.jsonl")
    return ["plan", SMOKE, f"data.train={folder / 'data.jsonl'}"]


def _loop(folder: Path) -> list[str]:
    (folder / "a.jsonl").symlink_to(folder / "b.jsonl")
    (folder / "b.jsonl").symlink_to(folder / "a.jsonl")
    return ["plan", SMOKE, f"data.train={folder / 'a.jsonl'}"]


def _laughs(levels: int = 12) -> str:
    lines = ["schema: 1", "version: 1.0.0", "description: laughs", "extends: smoke", 'x0: &x0 ["lol"]']
    for level in range(1, levels):
        lines.append(f"x{level}: &x{level} [" + ", ".join([f"*x{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _unknown_keys(count: int) -> str:
    return "extends: smoke\ntrain:\n" + "".join(f"  key_{i}: 1\n" for i in range(count))


def _template(name: str, data: str | bytes) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        path = _write(folder / name, data)
        return ["plan", SMOKE, f"data.chat_template={path}"]

    return make


def _damaged_store(summary: bytes) -> Callable[[Path], list[str]]:
    """The prepared data of a copy of the smoke data (a store of its own), its summary.json then
    replaced: the next plan must prepare it again with a warning."""

    def make(folder: Path) -> list[str]:
        sys.path.insert(0, str(ROOT))  # run as a script, only benchmarks/ is on the path
        from finetune.data.store import data_tokenizer, open_store
        from finetune.recipe.schema import load_recipe

        data = _write(folder / "rows.jsonl", (ROOT / "data_samples/code_chat.jsonl").read_text() + "\n")
        recipe = load_recipe(ROOT / SMOKE, [f"data.train={data}"])
        built = open_store(recipe, data_tokenizer(recipe))
        (built.directory / "summary.json").write_bytes(summary)
        return ["plan", SMOKE, f"data.train={data}"]

    return make


def _completions(data: bytes, *args: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        path = _write(folder / "c.jsonl", data)
        return ["eval", "--completions", str(path), "--allow-code-execution", *args]

    return make


def _damaged(verb: str, damage: Callable[[Path], None], *args: str) -> Callable[[Path, Path], list[str]]:
    """A copy of the finished run, damaged; for resume, stopped before its end (no adapter), so
    that there is something to resume."""

    def make(folder: Path, run_dir: Path) -> list[str]:
        copy = folder / "run"
        shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns("gguf", "merged"))
        if verb == "resume":
            shutil.rmtree(copy / "adapter")
        damage(copy)
        return [verb, str(copy), *args]

    return make


def _in(run_dir: Path, relative: str) -> Path:
    """The file, or for a stopped run (no adapter/ yet) the same file of its latest checkpoint."""
    path = run_dir / relative
    if not path.exists() and relative.startswith("adapter/"):
        latest = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        path = latest / relative.removeprefix("adapter/")
    return path


def _truncate(relative: str, keep: int | None = None) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        path = _in(run_dir, relative)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 if keep is None else keep])

    return damage


def _replace(relative: str, text: str) -> Callable[[Path], None]:
    return lambda run_dir: _in(run_dir, relative).write_text(text)


def _keep_only(relative: str, key: str) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        document = json.loads((run_dir / relative).read_text())
        (run_dir / relative).write_text(json.dumps({key: document[key]}))

    return damage


def _null_seal(run_dir: Path) -> None:
    for seal in run_dir.glob("checkpoints/*/finetune-seal.json"):
        seal.write_text("null")


def _finished_resume(folder: Path, run_dir: Path) -> list[str]:
    copy = folder / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns("gguf", "merged"))
    return ["resume", str(copy)]


DEEP = 100_000
ONE_COMPLETION = b'{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n'
HUGE = "9" * 5000
CASES: list[Case] = [
    # Data files
    Case("json nested deep", "data", _data("deep.jsonl", _deep_json(DEEP)), say="deep.jsonl:1"),
    Case(
        "json huge integer", "data", _data("huge.jsonl", '{"messages": ' + HUGE + "}\n"), say="huge.jsonl:1"
    ),
    Case(
        "json lone surrogate",
        "data",
        _data("sur.jsonl", json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}) + "\n"),
        say="sur.jsonl:1",
    ),
    Case(
        "csv field over the csv limit (long code is normal)",
        "data",
        _data("long.csv", "instruction,output\nwrite it," + "x" * 300_000 + "\nsay hi,hello\n"),
        expect=0,
        say="longer than max_seq_length",
    ),
    Case("gz not gzip", "data", _data("bad.jsonl.gz", b"this is not gzip\n"), say="bad.jsonl.gz"),
    Case(
        "gz truncated",
        "data",
        _data("cut.jsonl.gz", gzip.compress(_random_rows(500))[:3000]),
        say="cut.jsonl.gz",
    ),
    Case(
        "gz corrupt",
        "data",
        _data("corrupt.jsonl.gz", gzip.compress(b"x" * 5000)[:20] + b"\xff" * 200),
        say="corrupt.jsonl.gz",
    ),
    Case("data path a FIFO", "data", _fifo, say="FIFO"),
    Case("data path a symlink loop", "data", _loop, say="loop of symbolic links"),
    Case("data path /dev/stdin", "data", _smoke("data.train=/dev/stdin"), say="/dev/stdin"),
    # Recipes
    Case("yaml nested deep", "recipe", _recipe("extends: smoke\nx: " + "[" * DEEP + "]" * DEEP + "\n")),
    Case(
        "yaml huge integer",
        "recipe",
        _recipe(f"extends: smoke\ntrain:\n  max_steps: {HUGE}\n"),
        say="hostile.yaml:3",
    ),
    Case("override huge integer", "recipe", _smoke(f"train.max_steps={HUGE}"), say="max_steps"),
    Case(
        "epochs infinite",
        "recipe",
        _smoke("train.max_steps=null", "train.num_train_epochs=.inf"),
        say="epochs",
    ),
    Case(
        "epochs inf word",
        "recipe",
        _smoke("train.max_steps=null", "train.num_train_epochs=inf"),
        say="epochs",
    ),
    Case("max_steps true", "recipe", _smoke("train.max_steps=true"), say="max_steps"),
    Case("billion laughs", "recipe", _recipe(_laughs()), say="alias"),
    Case("many unknown keys", "recipe", _recipe(_unknown_keys(20_000)), say="more"),
    # Schedules
    Case("max_steps 10^30", "schedule", _smoke("train.max_steps=" + "1" + "0" * 30), say="max_steps"),
    Case(
        "epochs 1e300",
        "schedule",
        _smoke("train.max_steps=null", "train.num_train_epochs=1e300"),
        say="epochs",
    ),
    Case("max_steps 10^6 plans fast", "schedule", _smoke("train.max_steps=1000000"), expect=0),
    Case("max_steps 10^8 (2 years here)", "schedule", _smoke("train.max_steps=100000000"), say="years"),
    # Flags
    Case("eval --k -3", "flags", _completions(ONE_COMPLETION, "--k", "-3"), say="--k"),
    Case("eval --k 0", "flags", _completions(ONE_COMPLETION, "--k", "0"), say="--k"),
    Case("plan --gpus -2", "flags", _smoke("--gpus", "-2"), say="--gpus"),
    Case("plan --gpus 0", "flags", _smoke("--gpus", "0"), say="--gpus"),
    *[
        Case(
            f"generate --max-new-tokens {n}",
            "flags",
            lambda folder, n=n: ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", n],
            say="--max-new-tokens",
        )
        for n in ("0", "-5")
    ],  # fmt: skip
    Case("output.dir on /proc", "flags", _smoke("output.dir=/proc/finetune-runs"), say="cannot be written"),
    Case("output.dir read-only", "flags", _smoke("output.dir=/sys/finetune-runs"), say="cannot be written"),
    Case("schema to a full device", "flags", lambda f: ["schema", "--output", "/dev/full"], say="/dev/full"),
    # The prepared-data store
    *[
        Case(f"store summary.json {what}", "store", _damaged_store(summary), expect=0, say="is damaged")
        for what, summary in (("truncated", b'{"rows": 4'), ("empty", b""), ("a list", b"[]"))
    ],
    # Completions
    Case(
        "completions not UTF-8",
        "completions",
        _completions(b'{"task_id": "HumanEval/0", "completion": "\xff\xfe"}\n'),
        say="c.jsonl:1",
    ),
    Case(
        "completions with a lone surrogate",
        "completions",
        _completions(b'{"task_id": "HumanEval/0", "completion": "    return \\"\\ud800\\"\\n"}\n'),
        expect=0,
    ),
    # Chat templates
    Case(
        "template syntax error",
        "template",
        _template("bad.jinja", "{% for m in messages %}{{ m.content }"),
        say="bad.jinja",
    ),
    Case(
        "template binary bytes",
        "template",
        _template("bin.jinja", b"\x00\xff\xfe{{ messages }}\x80"),
        say="bin.jinja",
    ),
    Case(
        "template renders no message",
        "template",
        _template("plain.jinja", "just some text\n"),
        say="plain.jinja",
    ),
    # Damaged run folders
    *[
        Case(f"{verb}: {what}", "run", _damaged(verb, damage, *args), expect=-1, say=said, needs_run=True)
        for verb, args in (
            ("resume", ()),
            ("export", ()),
            ("generate", ("--prompt", "hi")),
            ("calibration", ()),
        )
        for what, damage, said in (
            ("run.json not JSON", _replace("run.json", "{not json"), "run.json"),
            ("manifest.json missing keys", _keep_only("manifest.json", "created"), "manifest.json"),
            ("run.json missing keys", _keep_only("run.json", "version"), "run.json"),
            ("a seal that is null", _null_seal, "checkpoint"),
            (
                "adapter safetensors truncated",
                _truncate("adapter/adapter_model.safetensors"),
                "adapter_model.safetensors",
            ),
            (
                "adapter_config.json broken",
                _replace("adapter/adapter_config.json", '{"r": '),
                "adapter_config.json",
            ),
            ("budget.json truncated", _truncate("budget.json"), "budget.json"),
        )
    ],
    Case("resume of a finished run", "run", _finished_resume, say="finished", needs_run=True),
]


def classify(case: Case, code: int, stdout: str, stderr: str, seconds: float) -> str:
    if "Traceback (most recent call last)" in stderr or code not in (0, 2, 3):
        return "traceback"
    if seconds > (RUN_SECONDS if case.needs_run else HANG_SECONDS):
        return "hang"
    if case.expect == -1:
        case = Case(case.name, case.kind, case.make, expect=code, say=case.say if code == 2 else "")
    said = stderr if case.expect != 0 else stdout + stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]  # argparse's: "runner.py: error:"
    if code != case.expect or case.say not in said or (case.expect == 2 and len(errors) != 1):
        return "wrong"
    return "held"


def run_case(case: Case, run_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        argv = case.make(folder, run_dir) if case.needs_run else case.make(folder)
        started = time.monotonic()
        try:
            done = subprocess.run(
                [PYTHON, "runner.py", *argv], cwd=ROOT, capture_output=True, text=True,
                timeout=KILL_SECONDS, stdin=subprocess.DEVNULL,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
            )  # fmt: skip
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as timeout:
            code, stdout, stderr = -9, str(timeout.stdout or ""), str(timeout.stderr or "")
        seconds = time.monotonic() - started
    verdict = "hang" if code == -9 else classify(case, code, stdout, stderr, seconds)
    tail = [line for line in stderr.splitlines() if line.strip()][-1:] or [""]
    return {
        "case": case.name, "kind": case.kind, "verdict": verdict, "exit": code,
        "seconds": round(seconds, 1), "said": tail[0][:300],
    }  # fmt: skip


def train_one(folder: Path) -> Path:
    done = subprocess.run(
        [PYTHON, "runner.py", SMOKE, "train.max_steps=2", "train.warmup_steps=1", "train.save_steps=1",
         "output.samples=0", f"output.dir={folder}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"training the run to damage failed:\n{done.stderr[-3000:]}")
    return next((folder / "smoke").iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run folder to copy and damage")
    parser.add_argument("--json", type=Path, help="write every case's verdict here")
    parser.add_argument("-k", default="", help="only the cases whose name holds this")
    args = parser.parse_args()
    cases = [case for case in CASES if args.k in case.name]
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run
        if run_dir is None and any(case.needs_run for case in cases):
            run_dir = train_one(Path(scratch))
        results = []
        for case in cases:
            result = run_case(case, run_dir)
            results.append(result)
            print(f"{result['verdict']:9} {result['seconds']:5.1f} s  exit {result['exit']:3}  "
                  f"{case.kind:11} {case.name}: {result['said'][:160]}", flush=True)  # fmt: skip
    counts = {
        verdict: sum(r["verdict"] == verdict for r in results)
        for verdict in ("traceback", "hang", "wrong", "held")
    }
    print(f"{len(results)} cases: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items()))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "results": results}, indent=1) + "\n")
    return 0 if counts["held"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
