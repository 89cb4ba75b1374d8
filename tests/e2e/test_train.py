"""End to end through the real stack: Unsloth 4-bit load, LoRA, TRL's SFTTrainer, save, reload, generate.

The tiny Llama 3 trains on the CPU in seconds, so the whole path that a GPU run takes is exercised here.
"""

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from cli_helpers import runner
from data_helpers import examples_dataset, load_conversations

from finetune.data.store import prepared_data
from finetune.models.tiny_model import TINY_CONFIG
from finetune.plan import calibration, engine
from finetune.plan.devices import GPUS
from finetune.plan.job import plan_job
from finetune.recipe.schema import load_recipe
from finetune.runs.outcome import Measured
from finetune.runs.report import shown_completion
from finetune.train import inference, training

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the smoke recipe for a few steps, keeping the parameters from before and after."""
    samples = ROOT / "data_samples"
    recipe = load_recipe(
        ROOT / "recipes" / "smoke.yaml",
        [
            "train.max_steps=12",
            f"data.train={samples / 'code_chat.jsonl'}",
            f"data.eval={samples / 'code_alpaca.jsonl'}",
            "train.eval_steps=6",
        ],
    )
    run_dir = tmp_path_factory.mktemp("run")
    model, tokenizer = training.load_model(recipe)
    model = training.add_lora(model, recipe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    store = prepared_data(recipe)
    trainer = training.build_trainer(
        model, tokenizer, store.dataset("train"), recipe, run_dir, store.dataset("eval")
    )
    trainer.train()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    return recipe, trainer, tokenizer, before, after, run_dir


def test_loss_is_finite_and_goes_down(trained):
    _, trainer, *_ = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


def test_eval_loss_is_computed_on_the_eval_data(trained):
    _, trainer, *_ = trained
    evals = [
        (entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry
    ]
    assert [step for step, _ in evals] == [6, 12]
    assert all(math.isfinite(loss) for _, loss in evals) and evals[1][1] < evals[0][1]


def test_every_lora_weight_changed_and_no_base_weight_did(trained):
    _, _, _, before, after, _ = trained
    lora = [name for name in before if "lora_" in name]
    base = [name for name in before if "lora_" not in name]
    # 2 layers x 7 projections x (A, B)
    assert len(lora) == 28
    unchanged_lora = [name for name in lora if torch.equal(before[name], after[name])]
    assert unchanged_lora == []
    # The frozen base includes the 4-bit packed weights, the 16-bit embeddings, lm_head and norms.
    assert any(before[name].dtype == torch.uint8 for name in base), "base weights should be 4-bit"
    changed_base = [name for name in base if not torch.equal(before[name], after[name])]
    assert changed_base == []


def test_only_assistant_tokens_are_trained(trained):
    _, trainer, tokenizer, *_ = trained
    row = trainer.train_dataset[0]
    trained_ids = [tok for tok, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    text = tokenizer.decode(trained_ids)
    assert "<|start_header_id|>" not in text and "Cutting Knowledge" not in text
    assert text.endswith("<|eot_id|>")  # the end-of-turn token is trained, so the model learns to stop


def test_our_masking_equals_unsloths_train_on_responses_only(trained, tmp_path):
    """Unsloth's own response masking, run over the same conversations tokenized by the real
    transformers tokenizer, marks exactly the tokens our torch-free preparation marks."""
    from datasets import Dataset
    from unsloth.chat_templates import train_on_responses_only

    recipe, trainer, tokenizer, *_ = trained
    conversations = load_conversations(recipe.data.train)
    ours = list(prepared_data(recipe).examples())
    ids = [
        tokenizer.apply_chat_template(c.messages, tokenize=True, return_dict=True)["input_ids"]
        for c in conversations
    ]
    assert ids == [example.input_ids for example in ours]  # same tokens as transformers' own rendering
    no_eval = recipe.model_copy(update={"train": recipe.train.model_copy(update={"eval_steps": None})})
    theirs = training.build_trainer(trainer.model, tokenizer, examples_dataset(ours), no_eval, tmp_path)
    theirs.train_dataset = Dataset.from_dict({"input_ids": ids, "labels": [list(i) for i in ids]})
    theirs = train_on_responses_only(
        theirs,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert [row["labels"] for row in theirs.train_dataset] == [example.labels for example in ours]


def test_static_memory_terms_equal_the_bytes_of_the_loaded_and_trained_model(trained):
    """The budget's weight, LoRA and optimizer terms, byte for byte, against what Unsloth loaded
    (4-bit through bitsandbytes' CPU backend, fp32 on this CPU) and what the optimizer holds."""
    from finetune.models.shapes import Shapes
    from finetune.plan.budget import predict_memory

    recipe, trainer, *_ = trained
    model = trainer.model
    quantized = kept = lora = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            extra = [state.absmax, state.code, state.state2.absmax, state.state2.code]
            quantized += size + sum(t.numel() * t.element_size() for t in extra) + 4  # + fp32 offset
        elif "lora_" in name:
            lora += size
        else:
            kept += size
    # On the CPU the fallback swaps 8-bit AdamW for fused AdamW, and the frozen weights are fp32 on
    # most CPUs but bf16 where the CPU has native bf16 (AMX, AVX512-BF16): the terms are checked for
    # the dtype Unsloth chose (which one the plan assumes on such a CPU is a known gap: it assumes
    # fp32). On a GPU: bitsandbytes' 8-bit AdamW, whose state for tensors under 4096 values (most of
    # the tiny model's) is 32-bit.
    on_gpu = torch.cuda.is_available()
    dtype_bytes = model.get_input_embeddings().weight.element_size()
    terms = predict_memory(recipe, Shapes.from_config(TINY_CONFIG), 1, dtype_bytes, on_gpu=on_gpu).terms
    assert quantized == terms["4-bit base weights"]
    assert kept == terms["embeddings, lm_head, norms"]
    assert lora == terms["LoRA parameters"] == terms["LoRA gradients"]
    moments = sum(
        t.numel() * t.element_size()
        for state in trainer.optimizer.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2")
    )
    optim = engine.effective_optimizer(recipe.train.optim, on_gpu)
    assert moments == terms[f"optimizer state ({optim})"]


def test_saved_adapter_reloads_with_the_trained_weights_and_generates(trained):
    recipe, _, _, _, after, run_dir = trained
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == recipe.lora.r and config["lora_alpha"] == recipe.lora.alpha
    model, tokenizer = inference.load_adapter(run_dir / "adapter", recipe.model.max_seq_length)
    reloaded = dict(model.named_parameters())
    for name, value in after.items():
        if "lora_" in name:
            assert torch.equal(reloaded[name].detach().to(value.dtype), value), name
    text = inference.generate(
        model, tokenizer, "Write a Python function that reverses a string.", max_new_tokens=8
    )
    assert isinstance(text, str) and len(text) > 0


# The command line's run, shared by the tests below (each checks other things of it): the smoke
# recipe for 6 steps, with a chat template of our own given on the command line.
RUN = ["recipes/smoke.yaml", "train.max_steps=6", "data.chat_template=llama-3.1-instruct-exact"]


@pytest.fixture(scope="module")
def run_by_the_cli(tmp_path_factory):
    """`runner.py RUN` in a fresh process: its output and its run folder."""
    output = tmp_path_factory.mktemp("cli")
    out = runner(*RUN, f"output.dir={output}")
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (output / "smoke").iterdir()
    return out, run_dir


def test_runner_trains_and_prints_one_summary_line(run_by_the_cli):
    out, run_dir = run_by_the_cli
    output = run_dir.parent.parent
    summary = [line for line in out.stdout.splitlines() if line.startswith("Done:")]
    assert len(summary) == 1 and summary[0].startswith("Done: 6 steps in ")
    assert "step     6/6  loss" in out.stdout + out.stderr  # the loss at each logging step
    # Nothing but what we mean to say: no debugging line left in a callback (one printed
    # "DEBUG None None" at every run's start).
    assert not [line for line in out.stdout.splitlines() if line.startswith("DEBUG")]
    # One progress display: written to a pipe, the step lines alone (one per logging step, on
    # stdout), no progress bar's carriage returns, and no library notice a user can do nothing about.
    assert [line.split("  loss")[0] for line in out.stdout.splitlines() if line.startswith("step ")][:6] == [
        f"step {k:>5}/6" for k in range(1, 7)
    ]
    assert "\r" not in out.stdout + out.stderr and "it/s" not in out.stderr
    for notice in (
        "_pytree",
        "pip install kernels",
        "Loading weights",
        "Truncating train dataset",
        "PAD/BOS/EOS",
    ):
        assert notice not in out.stderr, notice
    assert summary[0].endswith(f"adapter saved to {run_dir / 'adapter'}")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    # The dtype the model computed in, as Unsloth said it (bfloat16 on a CPU with AMX, else float32).
    compute = json.loads((run_dir / "manifest.json").read_text())["device"]["compute_dtype"]
    assert torch.cuda.is_available() or f"dtype = torch.{compute}," in out.stdout + out.stderr
    assert load_recipe(run_dir / "recipe.yaml").train.max_steps == 6  # the resolved recipe, override applied
    assert json.loads((run_dir / "run.json").read_text())["overrides"] == [*RUN[1:], f"output.dir={output}"]
    # The template the data was rendered with travels with the adapter, for inference.
    exact = (ROOT / "finetune" / "data" / "templates" / "llama-3.1-instruct-exact.jinja").read_text()
    assert (run_dir / "adapter" / "chat_template.jinja").read_text() == exact
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    # The schedule preview is printed and saved before training, and the logged LRs follow it.
    assert (
        "schedule: cosine, 6 optimizer steps" in out.stdout
        and "warmup: 3 steps (50.0% of training)" in out.stdout
    )
    plan = json.loads((run_dir / "plan.json").read_text())
    assert [entry["learning_rate"] for entry in logged if "learning_rate" in entry] == pytest.approx(
        plan["lr_per_step"], rel=1e-12
    )
    assert (run_dir / "lr_schedule.png").read_bytes()[:4] == b"\x89PNG"
    # Predicted next to measured, for `runner.py calibration`.
    record = json.loads((run_dir / "budget.json").read_text())
    # The device trained on: this CPU, or the GPU torch uses (as the plan named it).
    device = plan["budget"]["device"] if torch.cuda.is_available() else "CPU"
    assert record["recipe"] == "smoke" and record["device"] == device
    assert len(record["measured"]["step_seconds"]) == 6 and record["measured"]["median_step_seconds"] > 0
    assert "step time: " in out.stdout and "measured (median after warm-up)" in out.stdout
    table = runner("calibration", str(output))
    assert table.returncode == 0 and "smoke" in table.stdout.splitlines()[1]
    if torch.cuda.is_available():
        assert record["predicted"]["time_predicted"] and record["step_error"] == pytest.approx(
            record["predicted"]["step_seconds"] / record["measured"]["median_step_seconds"] - 1
        )
        assert "step time: mean |error|" in table.stdout
    else:  # a CPU's step time is measured, not predicted: no error is made up for it
        assert not record["predicted"]["time_predicted"] and record["step_error"] is None
        assert "not predicted on a CPU" in out.stdout and "step time: mean |error|" not in table.stdout
        assert table.stdout.splitlines()[1].split()[3] == "-"  # the "step pred" column
    # The report: figures from the log, curves, and held-out prompts answered before and after.
    report = (run_dir / "report.md").read_bytes().decode()  # as written: a completion may hold "\r\n"
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    assert f"train loss: first {losses[0]:.4f}, final {losses[-1]:.4f}, best {min(losses):.4f}" in report
    assert f"report: {run_dir / 'report.md'}" in out.stdout
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and "](loss_curve.png)" in report
    samples = json.loads((run_dir / "samples.json").read_text())
    assert [s["source"] for s in samples] == [f"data_samples/code_chat.jsonl:{k}" for k in (1, 2, 3)]
    assert all(s["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") for s in samples)
    # Generated before and after training, each shown in the report (an empty completion, which a
    # barely trained tiny model can give on some CPUs, is said to be empty rather than left blank).
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples)
    assert all(f"After:\n\n```\n{shown_completion(s['after'])}\n```" in report for s in samples)
    assert "trained tokens/s" in report and (run_dir / "manifest.json").is_file()


def test_the_probe_frees_its_trainer_before_the_run_and_puts_the_weights_back(tmp_path, monkeypatch):
    """On a GPU, Unsloth's trainer keeps itself alive through a reference cycle (its __init__ sets
    ``self.train`` to a closure over ``self``, unsloth/trainer.py); the probe's trainer, with its
    optimizer state, must be gone when probe() returns, not whenever the garbage collector next runs.
    The CPU backend does not install that wrapper, so the test adds the same cycle."""
    build = training.build_trainer
    built = []

    def build_with_cycle(*args, **kwargs):
        trainer = build(*args, **kwargs)
        original = trainer.train
        trainer.train = lambda *a, **k: (trainer, original(*a, **k))[1]  # self -> closure -> self
        built.append(weakref.ref(trainer))
        return trainer

    monkeypatch.setattr(training, "build_trainer", build_with_cycle)
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml")
    model, tokenizer = training.load_model(recipe)
    model = training.add_lora(model, recipe)
    store = prepared_data(recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gc.collect()
    optimizers = {id(o) for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)}  # earlier tests'
    gc.disable()  # only probe() itself may collect
    try:
        lengths = store.summary["lengths"]
        measured = training.probe(model, tokenizer, recipe, store.dataset("train"), lengths, tmp_path)
        left = [
            o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer) and id(o) not in optimizers
        ]
    finally:
        gc.enable()
    assert len(built) == 1 and built[0]() is None and left == [] and len(measured.step_seconds) == 3
    # Back to their values (in the dtype the trainer trains them in: bf16 on Unsloth's CPU backend).
    assert all(torch.equal(p, before[n].to(p.dtype)) for n, p in model.named_parameters() if p.requires_grad)


def test_probe_measures_the_worst_case_then_restores_the_weights(tmp_path, run_by_the_cli):
    """A probe runs real steps on the longest rows, reports them against the budget, and leaves the
    run exactly as it would have been: the first logged loss equals the same run's without a probe
    (the shared run)."""
    # No --probe: a time limit turns it on, on a CPU too (a CPU's step time is only measured).
    probed = runner(*RUN, f"output.dir={tmp_path}", "budget.max_step_seconds=1000")
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert "probe: 3 steps on the worst-case micro-batch" in probed.stdout
    assert "PASS measured seconds per step" in probed.stdout
    # A probe slower than the limit stops the run (exit 3 in main); --force only warns.
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["budget.max_step_seconds=2"])
    on_h100 = plan_job(recipe, "recipes/smoke.yaml", "smoke", GPUS["h100"])
    slow = Measured([5.0, 5.0, 5.0], 10 * 2**30, 11 * 2**30)
    with pytest.raises(
        calibration.BudgetExceeded, match=r"FAIL measured seconds per step: 5\.00 s \(limit 2\.00 s\)"
    ):
        calibration.probe_verdict(on_h100, slow, force=False)
    forced = calibration.probe_verdict(on_h100, slow, force=True)  # warns, does not raise
    assert forced[-1] == "warning: --force: training although the probe broke the budget"
    _, plain = run_by_the_cli
    (probed_dir,) = (tmp_path / "smoke").iterdir()
    first = [json.loads((d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in (probed_dir, plain)]
    assert first[0] == first[1]


def test_padding_free_batching_is_decided_here_not_left_to_unsloth(tmp_path, monkeypatch):
    """Unsloth's generated SFTConfig (on a GPU) leaves padding_free unset, and its trainer then turns
    padding-free batching on by itself on some GPUs (unsloth/trainer.py, _should_auto_padding_free:
    only when it is None; that module is a stub on the CPU backend). So it is always passed, as
    False: the plan's padded micro-batches are what trains."""
    passed = {}
    real = training.SFTConfig

    def recording(**kwargs):
        passed.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(training, "SFTConfig", recording)
    config = training.build_sft_config(load_recipe(ROOT / "recipes" / "smoke.yaml"), tmp_path)
    assert passed["padding_free"] is False and config.padding_free is False


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.gradient_checkpointing=off"],
        ["model.gradient_checkpointing=standard"],
        ["model.gradient_checkpointing=unsloth", "data.packing=true"],
    ],
)
def test_the_trainer_runs_what_the_engine_decided(tmp_path, overrides):
    """The plan reads plan.engine; so does the trainer: the SFTConfig it builds carries the same
    checkpointing, packing and padding-free batching (the optimizer that steps is held to the
    plan's in test_static_memory_terms_equal_the_bytes_of_the_loaded_and_trained_model)."""
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", overrides)
    decided = engine.engine_for(recipe, torch.cuda.is_available())
    config = training.build_sft_config(recipe, tmp_path)
    assert config.gradient_checkpointing == (decided.checkpointing != "off")
    assert (config.packing, config.padding_free) == (decided.packing, decided.padding_free)
    if recipe.data.packing and not torch.cuda.is_available():  # Unsloth's CPU fallback cannot pack
        assert config.packing is False and decided.packing_off.startswith("packing is off on the CPU")


def test_sft_config_carries_every_schedule_setting(tmp_path):
    from transformers import get_scheduler

    recipe = load_recipe(
        ROOT / "recipes" / "smoke.yaml",
        ["train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_rate=0.1", "train.warmup_steps=4"],
    )
    config = training.build_sft_config(recipe, tmp_path)
    assert (config.learning_rate, config.lr_scheduler_type.value) == (1e-2, "cosine_with_min_lr")
    assert config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert config.get_warmup_steps(30) == 4
    assert config.per_device_train_batch_size == 2 and config.gradient_accumulation_steps == 2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=4,
        num_training_steps=30,
        scheduler_specific_kwargs=config.lr_scheduler_kwargs,
    )
    lrs = []
    for _ in range(30):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[4] == pytest.approx(1e-2) and min(lrs[4:]) >= 1e-3 - 1e-12

    ratio = load_recipe(
        ROOT / "recipes" / "smoke.yaml", ["train.warmup_steps=null", "train.warmup_ratio=0.1"]
    )
    assert training.build_sft_config(ratio, tmp_path).get_warmup_steps(30) == 3


def test_export_merges_the_adapter_and_generate_streams_an_answer(run_by_the_cli):
    """A finished run's adapter (the shared run's), merged into 16-bit weights that plain
    transformers loads and that compute what base + adapter computes; and `generate` answering a
    prompt from the run folder."""
    from transformers import AutoModelForCausalLM

    _, run_dir = run_by_the_cli
    exported = runner("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"merged 16-bit model saved to {run_dir / 'merged'}" in exported.stdout
    assert "export: merged into tiny-llama-3 (16-bit)" in exported.stdout  # which base, said
    assert "merged into tiny-llama-3 (16-bit)." in (run_dir / "merged" / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", torch_dtype=torch.float32)
    adapted, tokenizer = inference.load_adapter(run_dir / "adapter", 1024, load_in_4bit=False)
    base = AutoModelForCausalLM.from_pretrained(training.model_path(load_recipe(run_dir / "recipe.yaml")))
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():  # each model on its own device (Unsloth puts the adapter on a GPU if any)
        want, got, without = (m(ids.to(m.device)).logits.float().cpu() for m in (adapted, merged, base))
    # 16-bit rounding of the merged weights: fp16's, or bf16's (8x coarser) where the CPU has native
    # bf16 and Unsloth loads the adapter's base in bf16.
    tolerance = 0.4 if adapted.dtype == torch.bfloat16 else 0.05
    assert (got - want).abs().max() < tolerance
    assert (without - want).abs().max() > 0.5  # and the adapter really is in there

    answered = runner("generate", str(run_dir), "--prompt", "Reverse a list.", "--max-new-tokens", "8")
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr[-3000:]
    again = runner("export", str(run_dir))
    assert (
        again.returncode == 2 and "already exists and is not empty; nothing was overwritten" in again.stderr
    )
