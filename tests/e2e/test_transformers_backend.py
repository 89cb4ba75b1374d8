"""model.backend: transformers: the same recipe through plain transformers + PEFT + bitsandbytes and
TRL's SFTTrainer, with unsloth never imported. Every test runs in processes of its own, since this
test process has Unsloth loaded (and patching the libraries) already.

On this CPU the 4-bit base is bitsandbytes' CPU NF4 (the same as on a GPU, slower), and the 8-bit
AdamW falls back to torch's fused AdamW, which the plan says (plan.engine.effective_optimizer). TRL's
SFTTrainer casts the LoRA weights to bf16 on a 4-bit base, here as on a GPU; the plan counts them so
(plan.engine.adapter_bytes).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli, runner
from safetensors import safe_open

from finetune.evaluate.evaluation import read_tasks
from finetune.runs.run_folder import SEAL

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
BACKEND = "model.backend=transformers"

# Trains the smoke recipe in-process on the transformers backend, from a pre-quantized 4-bit base (the
# GPU recipes' form) without gradient checkpointing, and reports what changed and what ran.
_TRAIN_AND_COMPARE = """
import json, sys
from pathlib import Path
from finetune.train.backend import use_backend
use_backend("transformers")
from finetune.train import stack
from finetune.train import training
from finetune.plan.budget import predict_memory
from finetune.recipe.schema import load_recipe
from finetune.models.shapes import Shapes
from finetune.data.store import prepared_data
from finetune.models.tiny_model import TINY_CONFIG
overrides = [f"model.name={sys.argv[2]}", "model.gradient_checkpointing=off"]
recipe = load_recipe("recipes/smoke.yaml", ["model.backend=transformers", "train.max_steps=10", *overrides])
model, tokenizer = training.load_model(recipe)
model = training.add_lora(model, recipe)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
store = prepared_data(recipe)
trainer = training.build_trainer(model, tokenizer, store.dataset("train"), recipe, Path(sys.argv[1]))
trainer.train()
after = dict(model.named_parameters())
lora = [n for n in before if "lora_" in n]
print(json.dumps({
    "backend": stack.BACKEND,
    "unsloth_imported": "unsloth" in sys.modules,
    "lora": len(lora),
    "lora_unchanged": [n for n in lora if before[n].equal(after[n])],
    "base_changed": [n for n in before if "lora_" not in n and not before[n].equal(after[n])],
    "four_bit": sorted({str(p.dtype) for n, p in before.items() if "lora_" not in n}),
    "optimizer": type(trainer.optimizer.optimizer).__name__,
    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    "lora_dtypes": sorted({str(after[n].dtype) for n in lora}),
    "lora_bytes": sum(after[n].numel() * after[n].element_size() for n in lora),
    "planned_lora_bytes": predict_memory(recipe, Shapes.from_config(TINY_CONFIG), 1, on_gpu=False).terms[
        "LoRA parameters"
    ],
    "checkpointing": [trainer.args.gradient_checkpointing, model.is_gradient_checkpointing],
}))
"""


def test_the_smoke_recipe_trains_without_unsloth_lora_changing_and_the_base_frozen(
    tmp_path, four_bit_tiny_model_dir
):
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN_AND_COMPARE, str(tmp_path), str(four_bit_tiny_model_dir)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "transformers" and result["unsloth_imported"] is False
    assert result["lora"] == 28 and result["lora_unchanged"] == []  # 2 layers x 7 projections x (A, B)
    assert result["base_changed"] == []
    assert "torch.uint8" in result["four_bit"]  # bitsandbytes' NF4 weights, on the CPU backend
    assert result["optimizer"] == "AdamW"  # adamw_8bit falls back to torch's fused AdamW on the CPU
    losses = result["losses"]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    # TRL's bf16 cast on the 4-bit base, as the plan counts it: half the bytes of fp32 adapters.
    assert result["lora_dtypes"] == ["torch.bfloat16"]
    assert result["lora_bytes"] == result["planned_lora_bytes"]
    # model.gradient_checkpointing=off reaches the trainer (TRL's SFTConfig defaults it on).
    assert result["checkpointing"] == [False, False]


# The runner's run on this backend, shared: the test of what it makes, and the uninterrupted run
# that the resumed one is held to.
RUN = ["recipes/smoke.yaml", BACKEND, "train.max_steps=8", "train.save_steps=4"]


@pytest.fixture(scope="module")
def trained_by_the_runner(tmp_path_factory):
    output = tmp_path_factory.mktemp("transformers")
    trained = run_cli(*RUN, f"output.dir={output}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    return trained, output


def test_the_runner_trains_generates_and_exports_on_the_transformers_backend(trained_by_the_runner):
    trained, tmp_path = trained_by_the_runner
    heavy = trained.stdout.strip().splitlines()[-1]
    assert heavy.startswith("heavy imports: [") and "'unsloth'" not in heavy and "'torch'" in heavy
    assert "memory on CPU with transformers + PEFT (no Unsloth)" in trained.stdout
    assert "activations (standard checkpointing)" in trained.stdout  # no offloading without Unsloth
    (run_dir,) = (tmp_path / "smoke").iterdir()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["budget"]["backend"] == "transformers"
    assert "logits and loss (transformers)" in plan["budget"]["memory_bytes"]
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        saved = [
            (str(t.get_dtype()), math.prod(t.get_shape())) for t in map(adapter.get_slice, adapter.keys())
        ]
    assert {dtype for dtype, _ in saved} == {"BF16"}  # as trained: TRL's cast, the plan's 2 bytes
    assert sum(2 * n for _, n in saved) == plan["budget"]["memory_bytes"]["LoRA parameters"]
    assert (run_dir / "report.md").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    answered = run_cli("generate", str(run_dir), "--prompt", "Reverse a list.", "--max-new-tokens", "8")
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert "'unsloth'" not in answered.stdout.strip().splitlines()[-1]
    tasks = tmp_path / "tasks.jsonl"  # two of HumanEval's, in its format
    tasks.write_text("".join(json.dumps(task) + "\n" for task in list(read_tasks("humaneval").values())[:2]))
    evaluated = run_cli(
        "eval", str(run_dir), "--tasks", str(tasks), "--max-new-tokens", "4", "--allow-code-execution"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "'unsloth'" not in evaluated.stdout.strip().splitlines()[-1]
    assert "0/2" in evaluated.stdout and (run_dir / "eval" / "humaneval.json").is_file()
    exported = run_cli("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "'unsloth'" not in exported.stdout.strip().splitlines()[-1]
    assert (run_dir / "merged" / "model.safetensors").is_file()


def start(output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "runner.py", *RUN, f"output.dir={output}"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_losses(output: Path) -> dict[int, float]:
    (run_dir,) = (output / "smoke").iterdir()
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}


def test_a_sigkilled_run_resumes_to_the_same_losses_on_the_transformers_backend(
    tmp_path, trained_by_the_runner
):
    """Killed after checkpoint-4 and resumed: every step's loss that of the uninterrupted run (the
    shared one, the same command line)."""
    _, whole = trained_by_the_runner
    killed = start(tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").glob(f"smoke/*/checkpoints/checkpoint-4/{SEAL}")):
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (run_dir,) = (tmp_path / "killed" / "smoke").iterdir()
    assert not (run_dir / "adapter").exists()
    resumed = runner("resume", str(run_dir), env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    losses = logged_losses(tmp_path / "killed")
    assert losses == logged_losses(whole) and len(losses) == 8
