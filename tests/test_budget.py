"""Budgets before launch: the static memory terms exactly, the gate, its suggestions, the CLI's exit 3."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
from cli_helpers import run_cli

from finetune.models import shapes
from finetune.models.shapes import Shapes, shipped_config
from finetune.models.tiny_model import TINY_CONFIG
from finetune.plan import budget, constants, disk, engine, loss_memory
from finetune.plan.budget import Workload, plan_budget, suggest
from finetune.plan.constants import GIB
from finetune.plan.devices import GPUS, gpu_by_name
from finetune.plan.job import plan_job
from finetune.recipe.schema import load_recipe
from finetune.runs.plots import nice_ticks

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit")
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_llama_8b_counts_from_the_shipped_config():
    llama = Shapes.from_config(LLAMA_8B)
    assert shapes.count_parameters(LLAMA_8B) == 8_030_261_248
    assert llama.linear_parameters == 6_979_321_856 and llama.embedding_parameters == 1_050_673_152
    assert shapes.lora_parameters(llama, 16, ALL_SEVEN) == 41_943_040


@pytest.mark.parametrize(
    "name, total",
    [
        # The totals the models' safetensors indexes publish (Hugging Face's "Model size").
        ("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", 8_030_261_248),
        ("unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit", 70_553_706_496),
        ("unsloth/Llama-3.2-3B-Instruct-bnb-4bit", 3_212_749_824),  # tied embeddings
        ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", 1_235_814_400),  # tied embeddings
    ],
)
def test_each_shipped_config_counts_its_published_total(name, total):
    assert shapes.count_parameters(shipped_config(name)) == total


def test_a_model_without_a_shipped_config_has_none():
    assert shipped_config("Qwen/Qwen2.5-Coder-7B-Instruct") is None


def _work(lengths=None, steps=100):
    return Workload(lengths, 200, False, steps)


def test_the_flagship_fits_a_24_gb_card_and_says_why():
    recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml")
    plan = plan_budget(recipe, Shapes.from_config(LLAMA_8B), GPUS["rtx-4090"], _work([4096] * 10))
    terms = plan.memory.terms
    # Worked out by hand from the config (not with budget's helpers): hidden 4096, 32 query heads and
    # 8 KV heads of 128, intermediate 14336, 32 layers, vocab 128256; (in, out) of each projection.
    h, kv, f, layers = 4096, 8 * 128, 14336, 32
    projections = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    weights = [i * o for i, o in projections]
    assert sum(weights) == 218_103_808  # per layer; every tensor is a whole number of 64 x 256 blocks
    # NF4 with double quantization, per tensor: 0.5 B per weight, one uint8 absmax per 64 weights,
    # one fp32 absmax per 256 of those blocks, the 16-entry NF4 code and the 256-entry nested code
    # (fp32) and the fp32 offset.
    double_quant = sum(n // 2 + n // 64 + 4 * (n // (64 * 256)) + 4 * (16 + 256 + 1) for n in weights)
    assert double_quant == 109_051_904 + 3_407_872 + 53_248 + 7 * 1_092
    assert terms["4-bit base weights"] == layers * double_quant == 3_600_661_376
    # bf16 embeddings + lm_head (untied: 2 x 128256 x 4096) + 65 RMSNorms of 4096: 2 B each
    assert terms["embeddings, lm_head, norms"] == 2 * (2 * 128_256 * 4096 + 65 * 4096)
    # LoRA r=32 on all seven projections: A is r x in and B is out x r; fp32 (4 B) on a GPU.
    lora = layers * sum(32 * i + o * 32 for i, o in projections)
    # Per unit of rank, 2,621,440 values: (in + out) of the seven projections, times 32 layers.
    assert lora == 32 * 2_621_440
    assert terms["LoRA parameters"] == 4 * lora
    # Without double quantization: 0.5 B per weight, one fp32 absmax per 64 weights, the NF4 code.
    single_quant = sum(n // 2 + 4 * (n // 64) + 4 * 16 for n in weights)
    assert single_quant == 109_051_904 + 13_631_488 + 7 * 64
    assert plan.memory.single_quant_weights == layers * single_quant == 3_925_882_880
    assert plan.memory.single_quant_weights > terms["4-bit base weights"]
    assert plan.memory.tokens_per_micro_batch == 2 * 4096
    assert plan.ok and 5 * GIB < plan.memory.total < 24 * GIB
    assert plan.time.step_seconds > 0 and plan.time.total_seconds == pytest.approx(
        100 * plan.time.step_seconds
    )


def test_every_budget_limit_is_checked_and_a_failure_comes_with_changes_that_fit():
    recipe = load_recipe(
        ROOT / "recipes" / "code-gen.yaml",
        [
            "budget.max_memory_gib=20",
            "budget.max_step_seconds=1000",
            "budget.max_hours=1000",
            "train.per_device_train_batch_size=8",
            "train.gradient_accumulation_steps=2",
            "model.gradient_checkpointing=standard",
            "train.optim=adamw_torch",
        ],
    )
    shapes, device, work = Shapes.from_config(LLAMA_8B), GPUS["a100-80gb"], _work([4096] * 10)
    plan = plan_budget(recipe, shapes, device, work)
    assert [v.what for v in plan.verdicts] == [
        "peak memory (+10%) on A100 80GB",
        "peak memory (budget)",
        "seconds per step",
        "total hours",
    ]
    assert [v.ok for v in plan.verdicts] == [True, False, True, True] and not plan.ok
    ideas = suggest(recipe, shapes, device, work)
    # The largest micro-batch that fits, with the effective batch kept (8 x 2 = 16).
    assert ideas[0].startswith(
        "fits: train.per_device_train_batch_size=4 train.gradient_accumulation_steps=4 "
        "(the same effective batch)"
    )
    assert any(i.startswith("fits: model.gradient_checkpointing=unsloth") for i in ideas)
    assert any("train.optim=adamw_8bit" in i for i in ideas) and any("lora.r=16" in i for i in ideas)
    smaller = load_recipe(
        ROOT / "recipes" / "code-gen.yaml",
        [
            "budget.max_memory_gib=20",
            "train.per_device_train_batch_size=4",
            "train.gradient_accumulation_steps=4",
        ],
    )
    assert plan_budget(smaller, shapes, device, work).ok  # the suggestion holds


def test_a_shorter_max_seq_length_is_suggested_with_the_rows_it_would_cut():
    recipe = load_recipe(
        ROOT / "recipes" / "code-gen.yaml", ["budget.max_memory_gib=8", "model.gradient_checkpointing=off"]
    )
    lengths = [500] * 95 + [4000] * 5
    ideas = suggest(recipe, Shapes.from_config(LLAMA_8B), GPUS["h100"], _work(lengths))
    assert any("model.max_seq_length=500" in i and "5 of 100 rows are longer" in i for i in ideas), ideas


def test_gpu_names_as_users_and_nvidia_smi_spell_them():
    assert gpu_by_name("RTX 4090") is gpu_by_name("NVIDIA GeForce RTX 4090") is GPUS["rtx-4090"]
    assert gpu_by_name("NVIDIA H100 80GB HBM3") is GPUS["h100"]
    assert gpu_by_name("NVIDIA A100-SXM4-80GB") is GPUS["a100-80gb"]
    assert gpu_by_name("NVIDIA A100-PCIE-40GB") is GPUS["a100-40gb"]
    assert gpu_by_name("NVIDIA H100 PCIe") is GPUS["h100-pcie"] and gpu_by_name("NVIDIA L4") is GPUS["l4"]
    assert gpu_by_name("NVIDIA L40S") is None and gpu_by_name("Voodoo 2") is None


def test_plan_json_for_a_gpu_this_machine_lacks_imports_nothing_heavy():
    out = run_cli("plan", "recipes/code-gen.yaml", "--json", "--gpu", "rtx-3090")
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout.splitlines()[0])
    plan = document["budget"]
    assert plan["device"] == "RTX 3090" and plan["ok"] is True
    assert plan["memory_total_bytes"] == pytest.approx(sum(plan["memory_bytes"].values()))
    assert plan["memory_upper_bytes"] == pytest.approx(plan["memory_total_bytes"] * 1.1)
    assert {"step_seconds", "total_hours", "verdicts", "tokens_per_micro_batch"} <= set(plan)
    assert out.stdout.splitlines()[1] == "heavy imports: []"


def test_plan_with_its_png_imports_neither_torch_nor_matplotlib(tmp_path):
    # What keeps `plan` under a second (benchmarks/validate_speed.py times it): matplotlib's import
    # alone costs most of a second here, so the LR chart is drawn with Pillow.
    png = tmp_path / "lr.png"
    code = (
        "import sys; from finetune.cli.commands import main; code = main(sys.argv[1:]);"
        "print('imported:', sorted(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "plan", "recipes/code-gen.yaml", "--gpu", "rtx-4090", "--png", str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "imported: []" in out.stdout
    image = PIL.Image.open(png)
    assert image.format == "PNG" and image.size == (900, 500)


def test_chart_ticks_are_round_numbers_that_cover_the_data():
    assert nice_ticks(301, count=8) == [0, 50, 100, 150, 200, 250, 300, 350]
    assert nice_ticks(2.1e-4) == pytest.approx([0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4])
    assert nice_ticks(6) == [0, 2, 4, 6]
    assert nice_ticks(0) == [0.0, 1.0]


def test_over_budget_run_is_refused_with_exit_3_before_anything_loads():
    out = run_cli("recipes/smoke.yaml", "budget.max_memory_gib=0.01")
    assert out.returncode == 3 and "Traceback" not in out.stderr
    assert "FAIL peak memory (budget)" in out.stdout
    assert "over budget: recipes/smoke.yaml is predicted not to fit" in out.stderr
    assert "--force launches anyway" in out.stderr
    assert "heavy imports: []" in out.stdout
    full = run_cli(
        "plan", "recipes/code-gen.yaml", "--gpu", "rtx-3090", "--full-length", "budget.max_hours=0.0001"
    )
    assert full.returncode == 3 and "FAIL total hours" in full.stdout
    assert "largest micro-batch 8192 tokens:" in full.stdout  # 2 x max_seq_length 4096
    # Sized from the sample data, the plan says that the recipe allows more, and how to plan that.
    sampled = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "rtx-3090")
    assert (
        "(from the data's rows; the recipe allows 8192: `plan --full-length` plans that):" in sampled.stdout
    )


def test_a_16_bit_plan_of_a_base_stored_in_4_bit_is_refused_naming_its_original(tmp_path):
    """Both engines load a pre-quantized checkpoint in 4-bit whatever load_in_4bit says: planning
    16-bit weights for it would promise what does not train."""
    out = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "rtx-3090", "model.load_in_4bit=false")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        "recipes/code-gen.yaml: model.load_in_4bit is false, but unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
        " is stored quantized to 4-bit, so it would train in 4-bit, not as planned; set model.load_in_4bit:"
        " true, or name its 16-bit original (unsloth/Meta-Llama-3.1-8B-Instruct) in model.name"
    ) in " ".join(out.stderr.split())
    # A local folder is known by its config, whatever its name.
    folder = tmp_path / "my-llama"
    folder.mkdir()
    config = {**shipped_config("llama-3.2-1b"), "quantization_config": {"load_in_4bit": True}}
    (folder / "config.json").write_text(json.dumps(config))
    local = run_cli(
        "plan",
        "recipes/llama-3.2-1b.yaml",
        "--gpu",
        "rtx-3090",
        f"model.name={folder}",
        "model.load_in_4bit=false",
    )
    assert local.returncode == 2 and f"but {folder} is stored quantized to 4-bit" in " ".join(
        local.stderr.split()
    )
    assert "original in model.name" in " ".join(local.stderr.split())
    # The same recipe in 4-bit, or the 16-bit original in 16-bit, plans.
    assert run_cli("plan", "recipes/code-gen.yaml", "--gpu", "rtx-3090").returncode == 0
    sixteen = run_cli(
        "plan", "recipes/code-gen.yaml", "--gpu", "a100-80gb", "model.load_in_4bit=false",
        "model.name=unsloth/Meta-Llama-3.1-8B-Instruct",
    )  # fmt: skip
    assert sixteen.returncode in (0, 3) and "stored quantized" not in sixteen.stderr, sixteen.stderr


def test_unknown_gpu_name_is_a_clear_error():
    out = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "voodoo-2")
    assert out.returncode == 2 and "unknown GPU 'voodoo-2'; known: rtx-3090" in out.stderr


def test_a_gpu_in_this_machine_is_planned_with_its_free_memory_and_the_speed_the_constants_fit(
    monkeypatch, tmp_path
):
    from finetune.plan import device_speed, devices

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    gpu = devices.Gpu("NVIDIA GeForce RTX 4090", 24.0, 20.5)
    monkeypatch.setattr(devices, "detect_gpus", lambda: [gpu])
    measured = {"tflops": 150.0, "bandwidth_gbs": 900.0, "measured_at": 0}
    monkeypatch.setattr(device_speed, "cached_measurement", lambda *a: measured)
    # A card of the table: its datasheet figures (what the time model's constants are fitted
    # against), and this card's free memory as the limit.
    device = devices.training_device()
    assert device.memory_bytes == 20.5 * GIB and device.name == gpu.name
    assert (device.bf16_tflops, device.bandwidth_gbs) == (165.2, 1008.0)
    # A card missing from the table: its measured speed, on the datasheet's scale, said so.
    monkeypatch.setattr(devices, "detect_gpus", lambda: [devices.Gpu("NVIDIA L40S", 45.0, 44.0)])
    l40s = devices.training_device()
    assert l40s.memory_bytes == 44.0 * GIB
    assert l40s.bf16_tflops == pytest.approx(150.0 / 0.75)
    assert l40s.bandwidth_gbs == pytest.approx(900.0 / 0.85)
    assert "measured on this GPU: 150 TFLOP/s" in l40s.source
    # Unmeasured too, it is never refused: its memory, and the slowest known card's speed, said so
    # (the time predicted is then an upper bound).
    monkeypatch.setattr(device_speed, "cached_measurement", lambda *a: None)
    unknown = devices.training_device()
    assert unknown.memory_bytes == 44.0 * GIB and unknown.bf16_tflops == min(
        d.bf16_tflops for d in GPUS.values()
    )
    assert "not measured and not in the speed table" in unknown.source


def test_plan_on_a_machine_with_the_card_agrees_with_plan_gpu_for_that_card_elsewhere(tmp_path, fresh_cache):
    """The same recipe, planned where the RTX 4090 is (nvidia-smi lists it; a speed measurement of it
    is cached) and with --gpu rtx-4090 on a machine without it: the same memory and step time."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\necho "0, GPU-5f2b8c1e, NVIDIA GeForce RTX 4090, 24564, 23000, 580.82.07"\n')
    smi.chmod(0o755)
    cache = fresh_cache
    speed = cache / "device-speed" / "cuda-NVIDIA-GeForce-RTX-4090.json"
    speed.parent.mkdir(parents=True)
    speed.write_text(json.dumps({"tflops": 121.0, "bandwidth_gbs": 870.0, "measured_at": time.time()}))
    path = f"{smi.parent}{os.pathsep}{os.environ['PATH']}"
    here_env = {"PATH": path, "FINETUNE_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "0"}
    here = run_cli("plan", "recipes/code-gen.yaml", "--json", env_extra=here_env)
    elsewhere = run_cli("plan", "recipes/code-gen.yaml", "--json", "--gpu", "rtx-4090")
    assert here.returncode == 0 and elsewhere.returncode == 0, here.stderr + elsewhere.stderr
    a = json.loads(here.stdout.splitlines()[0])["budget"]
    b = json.loads(elsewhere.stdout.splitlines()[0])["budget"]
    assert a["device"] == "NVIDIA GeForce RTX 4090" and b["device"] == "RTX 4090"
    assert a["memory_total_bytes"] == pytest.approx(b["memory_total_bytes"], rel=a["memory_margin"])
    assert a["step_seconds"] == pytest.approx(b["step_seconds"], rel=a["time_margin"])
    limits = {v["what"].split(" on ")[0]: v["limit"] for v in a["verdicts"]}
    assert limits["peak memory (+10%)"] == pytest.approx(23000 / 1024)  # the free memory, here


def test_a_gpu_model_planned_on_a_machine_without_gpu_gets_the_usual_24_gb_card():
    out = run_cli("plan", "recipes/code-gen.yaml", "--json")
    assert out.returncode == 0, out.stderr
    assert "no GPU here and this model needs one: planned for an RTX 4090" in out.stderr
    assert json.loads(out.stdout.splitlines()[0])["budget"]["device"] == "RTX 4090"
    tiny = run_cli("plan", "recipes/smoke.yaml", "--json")
    assert json.loads(tiny.stdout.splitlines()[0])["budget"]["device"] == "CPU" and "note" not in tiny.stderr


def test_a_device_speed_measurement_that_hangs_or_prints_nothing_falls_back_to_none(tmp_path, monkeypatch):
    import subprocess

    from finetune.plan import device_speed

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 300)

    monkeypatch.setattr(device_speed.subprocess, "run", hang)
    assert device_speed.cached_measurement("cuda", "Some GPU", tmp_path) is None
    silent = subprocess.CompletedProcess([], 0, stdout="", stderr="")
    monkeypatch.setattr(device_speed.subprocess, "run", lambda *a, **k: silent)
    assert device_speed.cached_measurement("cuda", "Some GPU", tmp_path) is None


def test_measured_peak_memory_means_the_same_quantity_the_plan_predicts_everywhere(tmp_path):
    """A GPU's counters (peak allocated 5 GiB, reserved 6 GiB) read the same in the probe's verdict,
    budget.json, the calibration table, report.md and the out-of-memory report: reserved plus the
    CUDA context, the quantity the plan's total predicts (allocated alone omits both)."""
    from finetune.plan import calibration
    from finetune.runs import report
    from finetune.runs.outcome import Measured, OutOfMemory

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["budget.max_memory_gib=100"])
    job = plan_job(recipe, "recipes/smoke.yaml", "smoke", GPUS["h100"])
    measured = Measured([1.0, 1.0, 1.0, 1.0], 5 * GIB, 6 * GIB)
    expected = 6 * GIB + constants.constant("cuda_context_bytes")
    assert calibration.measured_peak_bytes(6 * GIB) == expected == 6.5 * GIB

    probe = calibration.probe_verdict(job, measured, force=False)
    assert "peak memory 6.50 GiB" in probe[0]
    assert "PASS measured memory on H100 SXM: 6.50 GiB (limit 80.00 GiB)" in probe[1:]
    record = calibration.calibration_record(job.budget, measured.as_dict(), recipe.model.name, "smoke")
    assert record["measured_peak_bytes"] == expected
    assert record["memory_error"] == pytest.approx(job.budget.memory.total / expected - 1)
    assert " 6.50 " in calibration.calibration_table([record])[1]
    (tmp_path / "budget.json").write_text(json.dumps(record))
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    _, lines = report.write_report(tmp_path, history, 10.0, [])
    assert any(line.startswith("peak memory: 6.50 GiB measured") for line in lines), lines
    oom = report.out_of_memory_report(job, OutOfMemory(3, 1000, 6 * GIB), tmp_path)
    assert "peak memory measured: 6.50 GiB" in oom


def test_eight_bit_adamw_keeps_32_bit_state_for_small_tensors():
    """bitsandbytes' min_8bit_size: a tensor under 4096 values keeps two fp32 moments; larger ones a
    byte per moment plus an fp32 absmax per 256-value block of each."""
    assert budget.optimizer_state_bytes("adamw_8bit", [1024], 4) == 2 * 4 * 1024
    assert budget.optimizer_state_bytes("adamw_8bit", [4096], 4) == 2 * 4096 + 2 * 4 * 16
    assert budget.optimizer_state_bytes("adamw_8bit", [4097], 4) == 2 * 4097 + 2 * 4 * 17
    assert budget.optimizer_state_bytes("adamw_torch", [1024, 4096], 4) == 8 * 5120
    tiny = shapes.lora_tensor_sizes(Shapes.from_config(TINY_CONFIG), 8, ["q_proj", "down_proj"])
    assert tiny == [8 * 128, 128 * 8, 8 * 512, 128 * 8] * 2  # 2 layers
    # down_proj's A (8 x 512) is the one 8-bit tensor there.
    expected = 2 * (3 * 2 * 4 * 1024 + 2 * 4096 + 2 * 4 * 16)
    assert budget.optimizer_state_bytes("adamw_8bit", tiny, 4) == expected


def test_the_transformers_backend_has_its_own_memory_and_time_model():
    """No offloaded checkpointing without Unsloth, TRL's fused LM head on a GPU (transformers' full
    logits on the CPU), fp32 adapters on the CPU too, and the published speed gap on a GPU."""
    shapes = Shapes.from_config(shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"))
    code_gen = load_recipe(ROOT / "recipes" / "code-gen.yaml")
    plain = load_recipe(ROOT / "recipes" / "code-gen.yaml", ["model.backend=transformers"])
    assert (
        code_gen.model.gradient_checkpointing == "unsloth" and engine.checkpointing(plain.model) == "standard"
    )
    ours, theirs = (budget.predict_memory(r, shapes, 2048).terms for r in (code_gen, plain))
    assert "activations (standard checkpointing)" in theirs and "activations (unsloth checkpointing)" in ours
    tile = 2048 * 32768 * 2
    assert theirs["lm_head and loss (TRL's fused head)"] == tile + 2048 * 4096 * 8 + 40 * 2048
    on_cpu = budget.predict_memory(plain, shapes, 100, 4, on_gpu=False).terms
    assert on_cpu["logits and loss (transformers)"] == 100 * 128256 * 12 + 40 * 100
    assert theirs["LoRA parameters"] == ours["LoRA parameters"] / 2  # TRL's bf16 cast on a 4-bit base
    h100 = GPUS["h100"]
    work = Workload([2048] * 64, 64, False, 10)
    fast, slow = (plan_budget(r, shapes, h100, work) for r in (code_gen, plain))
    assert slow.backend == "transformers" and budget.budget_as_dict(slow)["backend"] == "transformers"
    kernels = slow.time.terms["without Unsloth's kernels"]
    matmuls, dequant = slow.time.terms["matmuls"], slow.time.terms["4-bit dequantization"]
    assert kernels == pytest.approx((matmuls + dequant) * 0.54)
    assert slow.time.step_seconds > fast.time.step_seconds
    assert budget.describe_budget(slow)[0].startswith("memory on H100 SXM with transformers + PEFT")


def test_the_adapters_are_planned_in_the_dtype_their_trainer_holds_them_in():
    """PEFT makes them fp32; TRL's own SFTTrainer casts them to bf16 on a 4-bit base, and it is the
    trainer of the transformers backend and of Unsloth's CPU fallback; Unsloth's generated GPU trainer
    leaves the cast out. DoRA's magnitudes stay fp32 under the cast (measured on the CPU:
    tests/e2e/test_train.py, test_transformers_backend.py)."""

    def model(backend: str, four_bit: bool = True):
        overrides = [f"model.backend={backend}", f"model.load_in_4bit={str(four_bit).lower()}"]
        return load_recipe(ROOT / "recipes" / "smoke.yaml", overrides).model

    assert engine.adapter_bytes(model("unsloth"), on_gpu=True) == 4
    assert engine.adapter_bytes(model("unsloth"), on_gpu=False) == 2
    assert engine.adapter_bytes(model("transformers"), on_gpu=True) == 2
    assert engine.adapter_bytes(model("transformers"), on_gpu=False) == 2
    for backend in ("unsloth", "transformers"):  # no cast without a quantized base
        assert engine.adapter_bytes(model(backend, four_bit=False), on_gpu=True) == 4
        assert engine.adapter_bytes(model(backend, four_bit=False), on_gpu=False) == 4

    llama = Shapes.from_config(LLAMA_8B)
    lora = 32 * 2_621_440  # code-gen: r=32 on all seven projections
    rows_out = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # DoRA's magnitudes
    plain = ["model.backend=transformers", "train.optim=adamw_torch"]
    for overrides, fp32 in [([], 0), (["lora.use_dora=true"], rows_out)]:
        recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml", plain + overrides)
        terms = budget.predict_memory(recipe, llama, 2048).terms
        assert terms["LoRA parameters"] == terms["LoRA gradients"] == 2 * lora + 4 * fp32
        assert terms["optimizer state (adamw_torch)"] == 2 * (2 * lora + 4 * fp32)  # two moments each
    recipe = load_recipe(ROOT / "recipes" / "code-gen.yaml", plain)
    checkpoint = disk.predict_disk(recipe, llama, 1000, True, None, 0, 8_030_261_248).checkpoint_bytes
    tensors = 32 * 7 * 2
    adapter, moments = 2 * lora + 512 * tensors, 4 * lora + 2 * 512 * tensors  # bf16, as saved
    small = disk.CHECKPOINT_SMALL_FILES_BYTES + 1000 * disk.BYTES_PER_STEP
    assert checkpoint == adapter + moments + disk.LLAMA3_TOKENIZER_BYTES + small


def test_the_report_says_a_sample_is_empty_or_missing_instead_of_leaving_a_blank(tmp_path):
    """A barely trained model may end its turn at once: the report says so, and says when the run
    stopped before the after-training sample was generated."""
    from finetune.runs import report

    (tmp_path / "samples.json").write_text(
        json.dumps(
            [
                {"source": "a.jsonl:1", "prompt": "p", "before": "def f(): pass", "after": ""},
                {"source": "a.jsonl:2", "prompt": "p", "before": " \n"},
            ]
        )
    )
    path, _ = report.write_report(tmp_path, [{"step": 1, "loss": 2.0}], 1.0, [])
    text = path.read_text()
    assert "Before:\n\n```\ndef f(): pass\n```" in text
    assert text.count("(empty: the model ended its turn at once)") == 2
    assert "After:\n\n```\n(not generated: the run did not finish)\n```" in text


def test_the_loss_term_follows_unsloths_fused_cross_entropy_not_a_logits_tensor():
    """Unsloth's GPU loss never makes T x V logits: at 16k tokens of Llama 3.1 8B its term is the
    chunk's fp32 block plus two T x H hidden-state gradients, far below one bf16 logits tensor."""
    shapes = Shapes.from_config(shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"))
    tokens = 16384
    term = loss_memory.logits_bytes(shapes.hidden, shapes.vocab, tokens, on_gpu=True)
    hidden_gradients = 2 * tokens * shapes.hidden * 2
    assert hidden_gradients < term < hidden_gradients + 0.5 * GIB
    assert term < tokens * shapes.vocab * 2 / 4  # a quarter of one bf16 logits tensor
    # Per token, only the hidden-state gradients grow: the chunk's scratch is fixed past 4096 rows.
    growth = loss_memory.logits_bytes(shapes.hidden, shapes.vocab, 2 * tokens, True) - term
    assert growth == pytest.approx(tokens * (4 * shapes.hidden + loss_memory.LOSS_BYTES_PER_TOKEN))


def test_a_paged_optimizer_is_said_to_live_outside_what_pytorch_measures(tmp_path):
    out = run_cli(
        "plan", "recipes/code-gen.yaml", "--gpu", "rtx-4090", "train.optim=paged_adamw_8bit", "--json"
    )
    document = json.loads(out.stdout.splitlines()[0])["budget"]
    assert document["paged_bytes"] == document["memory_bytes"]["optimizer state (paged_adamw_8bit)"] > 0
    text = run_cli(
        "plan",
        "recipes/code-gen.yaml",
        "--gpu",
        "rtx-4090",
        "train.optim=paged_adamw_8bit",
        "--png",
        str(tmp_path / "lr.png"),
    )
    assert "state live in CUDA unified memory" in text.stdout
    plain = run_cli("plan", "recipes/code-gen.yaml", "--gpu", "rtx-4090", "--json")
    assert json.loads(plain.stdout.splitlines()[0])["budget"]["paged_bytes"] == 0


def test_dora_adds_its_magnitudes_its_kept_outputs_its_workspace_and_its_time():
    llama = Shapes.from_config(LLAMA_8B)
    plain = load_recipe(ROOT / "recipes" / "code-gen.yaml")
    dora = load_recipe(ROOT / "recipes" / "code-gen.yaml", ["lora.use_dora=true"])
    tokens, rows_out = 4096, 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # one layer's outputs
    without = budget.predict_memory(plain, llama, tokens)
    with_dora = budget.predict_memory(dora, llama, tokens)
    assert not any(name.startswith("DoRA") for name in without.terms)
    # The magnitudes are trained like the LoRA weights: parameters, gradients, optimizer state.
    assert with_dora.terms["LoRA parameters"] - without.terms["LoRA parameters"] == 32 * rows_out * 4
    # Offloaded checkpointing: the base and LoRA outputs of the one layer being recomputed.
    assert with_dora.terms["DoRA activations"] == tokens * 2 * 2 * rows_out
    # down_proj's identity (14336^2, fp32 adapters) and its dense tensors set the workspace.
    assert with_dora.terms["DoRA weight-norm workspace"] == 14336**2 * 4 + 14336 * 4096 * (4 + 3 * 2)
    off = load_recipe(
        ROOT / "recipes" / "code-gen.yaml", ["lora.use_dora=true", "model.gradient_checkpointing=off"]
    )
    assert (
        budget.predict_memory(off, llama, tokens).terms["DoRA activations"] == 32 * tokens * 2 * 2 * rows_out
    )
    h100 = GPUS["h100"]
    slower = budget.predict_time(dora, llama, h100, tokens, 100).step_seconds
    assert slower > budget.predict_time(plain, llama, h100, tokens, 100).step_seconds


def test_weights_beyond_the_card_are_said_first_with_the_smallest_card_that_fits():
    """The 70B recipe on a 24 GB card: no suggestion of 0.1 GiB savings, the real problem instead."""
    out = run_cli("plan", "recipes/llama-3.1-70b.yaml", "--gpu", "rtx-4090")
    assert out.returncode == 3 and "Traceback" not in out.stderr
    said = " ".join(out.stderr.split())
    assert (
        "the model's weights alone are 37.3 GiB (with the CUDA context), more than the RTX 4090's 24 GiB"
        in said
    )
    assert "no setting makes it fit; the smallest card in the table it fits is the A100 80GB (80 GiB)" in said
    # ... and what to train on this card instead (the 8B recipes that fit it at full length).
    assert (
        "shipped recipes that fit the RTX 4090, of the largest model "
        "(unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit): code-gen, code-gen-16k, instruct-alpaca" in said
    )
    assert "helps:" not in said and "fits:" not in said


def test_a_cpus_step_time_is_not_predicted_and_its_time_limits_go_to_the_probe(tmp_path):
    """The CPU's step time follows the machine's load, not the GPU speed model: plan says it is not
    predicted, a time limit is not judged on it (the probe measures instead), and the calibration
    table and report.md show the measurement alone. On a GPU the same limit is a verdict."""
    from finetune.plan import calibration
    from finetune.plan.budget import CPU_TIME
    from finetune.plan.devices import cpu_device
    from finetune.runs import report
    from finetune.runs.outcome import Measured

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["budget.max_hours=0.00001"])
    job = plan_job(recipe, "recipes/smoke.yaml", "smoke", cpu_device())
    lines = job.lines()
    assert not job.budget.time_predicted and not job.over_budget
    assert CPU_TIME in lines and not any("s per optimizer step" in line for line in lines)
    assert (
        "  (budget.max_hours: checked on a CPU against the steps the probe measures before training, "
        "not by the plan)" in lines
    )
    assert plan_job(recipe, "recipes/smoke.yaml", "smoke", GPUS["h100"]).over_budget  # a GPU's verdict
    record = calibration.calibration_record(
        job.budget, Measured([1.0] * 4, None, None).as_dict(), "m", "smoke"
    )
    assert record["step_error"] is None and record["predicted"]["time_predicted"] is False
    row = calibration.calibration_table([record])[1].split()
    assert row[3:6] == ["-", "1.000", "-"]  # step pred, step meas, err
    (tmp_path / "budget.json").write_text(json.dumps(record))
    _, said = report.write_report(tmp_path, [{"step": 1, "loss": 2.0}], 10.0, [])
    assert "step time: 1.000 s measured, not predicted on a CPU" in said
