"""Fine-tune a model from a recipe: `python runner.py recipes/code-gen.yaml`.

A thin entry point; everything lives in the `finetune` package (see finetune/cli/commands.py).
"""

import sys

try:
    from finetune.cli.commands import main
except ModuleNotFoundError as missing:  # run with a Python that lacks our packages (not .venv's)
    if (missing.name or "").partition(".")[0] == "finetune":
        raise
    print(
        f"error: {missing.name} is not installed for {sys.executable}: run `make setup`, then "
        "`.venv/bin/python runner.py ...` (or `source .venv/bin/activate` first)",
        file=sys.stderr,
    )
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
