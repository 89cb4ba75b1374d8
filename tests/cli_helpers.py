"""Running the CLI in a fresh interpreter, as a user would, and seeing what it imported."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI, then prints which heavy libraries ended up imported (the light verbs import none).
_RUN_AND_REPORT_IMPORTS = (
    "import sys; from finetune.cli import main; code = main(sys.argv[1:]);"
    "heavy = [m for m in ('torch', 'unsloth', 'transformers', 'trl') if m in sys.modules];"
    "print('heavy imports:', heavy); sys.exit(code)"
)


def run_cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_IMPORTS, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
