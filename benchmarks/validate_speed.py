"""How long the light commands take, next to the import they avoid.

`validate`, `list`, `show` and `plan` import nothing heavy, so they answer in a fraction of the time
that `import unsloth` alone takes (`plan` without --json also draws lr_schedule.png, with Pillow).
Prints each command's median wall time over a few runs and its ratio
to `python -c "import unsloth"`, measured side by side in this one run.

    .venv/bin/python benchmarks/validate_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "recipes").glob("*.yaml"))]
COMMANDS = {
    "runner.py validate recipes/*.yaml": [sys.executable, "runner.py", "validate", *RECIPES],
    "runner.py list": [sys.executable, "runner.py", "list"],
    "runner.py show recipes/code-gen.yaml": [sys.executable, "runner.py", "show", "recipes/code-gen.yaml"],
    "runner.py plan code-gen --gpu rtx-4090 --json": [
        sys.executable,
        "runner.py",
        "plan",
        "recipes/code-gen.yaml",
        "--gpu",
        "rtx-4090",
        "--json",
    ],
    "runner.py plan code-gen --gpu rtx-4090 (+png)": [
        sys.executable,
        "runner.py",
        "plan",
        "recipes/code-gen.yaml",
        "--gpu",
        "rtx-4090",
        "--png",
        "/tmp/lr.png",
    ],
    'python -c "import unsloth"': [sys.executable, "-c", "import unsloth"],
}


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    results = {
        name: median_seconds(cmd, runs=1 if "unsloth" in name else 5) for name, cmd in COMMANDS.items()
    }
    baseline = results['python -c "import unsloth"']
    print(f"{'command':<48} {'median s':>9} {'vs import unsloth':>18}")
    for name, seconds in results.items():
        print(f"{name:<48} {seconds:>9.2f} {seconds / baseline:>17.3f}x")


if __name__ == "__main__":
    main()
