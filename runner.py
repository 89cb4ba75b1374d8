"""Fine-tune a model from a recipe: `python runner.py recipes/code-gen.yaml`.

A thin entry point; everything lives in the `finetune` package (see finetune/cli.py).
"""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
