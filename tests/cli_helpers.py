"""Running the CLI in a fresh interpreter, as a user would, and seeing what it imported.

`runner` is the one way the tests start the command line and wait for it: `runner.py ARGS`, from
the repository root (or ``cwd``), offline (HF_HUB_OFFLINE=1). `run_cli` is the same for the light
verbs, with CUDA hidden and the heavy libraries they ended up importing printed last.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI, then prints which heavy libraries ended up imported (the light verbs import none).
_REPORT_IMPORTS = (
    "heavy = [m for m in ('torch', 'unsloth', 'transformers', 'trl') if m in sys.modules];"
    "print('heavy imports:', heavy); sys.exit(code)"
)


def runner(
    *args: str,
    env_extra: dict | None = None,
    env: dict | None = None,
    cwd: Path = ROOT,
    timeout: float | None = 900,
    preamble: str = "",
    hide_gpu: bool = False,
    report_imports: bool = False,
) -> subprocess.CompletedProcess:
    """``runner.py ARGS`` in a fresh interpreter, its output captured as text.

    ``timeout``: seconds before it is killed (TimeoutExpired; a hang fails instead of waiting on);
    ``env``: the whole environment (default: this process's), to which HF_HUB_OFFLINE=1 and then
    ``env_extra`` are added; ``hide_gpu``: CUDA_VISIBLE_DEVICES empty (a CPU run on any machine);
    ``preamble``: Python run in that process before the command line (the tests' hooks into it; the
    command line then runs as runner.py's ``main``); ``report_imports``: the heavy libraries the
    command imported, printed last on stdout ("heavy imports: [...]")."""
    environment = {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1"}
    if hide_gpu:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    environment.update(env_extra or {})
    if preamble or report_imports:
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{preamble}\n"
        code += "from finetune.cli.commands import main; code = main(sys.argv[1:]);"
        code += _REPORT_IMPORTS if report_imports else "sys.exit(code)"
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, str(ROOT / "runner.py"), *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, env_extra: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A light verb as a user runs it, on the CPU, saying which heavy libraries it imported."""
    return runner(*args, env_extra=env_extra, cwd=cwd, hide_gpu=True, report_imports=True)


def finished_run_shape(run_dir: Path) -> Path:
    """What a finished run holds, as far as the checks before any heavy import look: its record,
    its recipe, and an adapter whose config and (empty) weights file are whole."""
    import json

    (run_dir / "adapter").mkdir(parents=True)
    config = {"r": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "tiny-llama-3"}
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    header = b'{"__metadata__":{}}'  # a safetensors file of no tensors: length, header, nothing
    weights = len(header).to_bytes(8, "little") + header
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (run_dir / "manifest.json").write_text("{}")
    (run_dir / "recipe.yaml").write_text((ROOT / "recipes" / "smoke.yaml").read_text())
    return run_dir
