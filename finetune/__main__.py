"""`python -m finetune ...` is `python runner.py ...`: how torchrun starts each process (no path to a
script in the checkout needed)."""

import sys

from finetune.cli.commands import main

sys.exit(main(sys.argv[1:]))
