"""What PEFT offers beyond plain LoRA, through Unsloth on the tiny model: DoRA trains (its magnitude
vectors too), counts as the plan counts it, saves and reloads; 'gaussian' initialisation reaches PEFT.
The DoRA run also trains with model.gradient_checkpointing=off, which must reach the trainer."""

from pathlib import Path

import pytest
import torch

from finetune.data.store import prepared_data
from finetune.models import shapes
from finetune.models.tiny_model import TINY_CONFIG
from finetune.plan import budget, engine
from finetune.recipe.schema import load_recipe
from finetune.train import inference, training

ROOT = Path(__file__).resolve().parents[2]


def smoke_recipe(*overrides):
    return load_recipe(ROOT / "recipes" / "smoke.yaml", ["train.max_steps=6", *overrides])


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    recipe = smoke_recipe("lora.use_dora=true", "model.gradient_checkpointing=off")
    run_dir = tmp_path_factory.mktemp("dora")
    model, tokenizer = training.load_model(recipe)
    model = training.add_lora(model, recipe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    store = prepared_data(recipe)
    trainer = training.build_trainer(model, tokenizer, store.dataset("train"), recipe, run_dir)
    trainer.train()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    return recipe, model, before, after, trainable, run_dir


def test_dora_trains_every_adapter_weight_and_its_magnitudes_and_no_base_weight(dora_run):
    _, _, before, after, trainable, _ = dora_run
    magnitudes = [name for name in trainable if "lora_magnitude_vector" in name]
    layers, targets = TINY_CONFIG["num_hidden_layers"], 7
    assert len(magnitudes) == layers * targets  # one per targeted projection: DoRA really is on
    assert [name for name in trainable if torch.equal(before[name], after[name])] == []
    frozen = [name for name in before if name not in trainable]
    assert [name for name in frozen if not torch.equal(before[name], after[name])] == []


def test_the_plan_counts_the_trainable_parameters_dora_has(dora_run):
    recipe, model, *_ = dora_run
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tiny = shapes.Shapes.from_config(TINY_CONFIG)
    assert counted == shapes.lora_parameters(tiny, recipe.lora.r, recipe.lora.target_modules, dora=True)
    assert counted > shapes.lora_parameters(tiny, recipe.lora.r, recipe.lora.target_modules)


def test_the_plan_counts_the_bytes_dora_trains_in(dora_run):
    """On this CPU Unsloth's trainer is TRL's own, which casts LoRA's A and B to bf16 on the 4-bit
    base and leaves the magnitudes fp32 (on a GPU Unsloth's keeps all fp32): as the plan counts."""
    recipe, model, *_ = dora_run
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    on_gpu = torch.cuda.is_available()
    adapter = engine.adapter_bytes(recipe.model, on_gpu)
    found: dict[str, set[int]] = {}
    for name, p in trained:
        found.setdefault("magnitudes" if "lora_magnitude_vector" in name else "A and B", set()).add(
            p.element_size()
        )
    assert found == {"A and B": {adapter}, "magnitudes": {engine.MAGNITUDE_BYTES}}
    assert on_gpu or adapter == 2
    tiny = shapes.Shapes.from_config(TINY_CONFIG)
    planned = budget.predict_memory(recipe, tiny, 1, on_gpu=on_gpu).terms["LoRA parameters"]
    assert sum(p.numel() * p.element_size() for _, p in trained) == planned


def test_gradient_checkpointing_off_reaches_the_trainer(dora_run):
    """TRL's SFTConfig defaults gradient_checkpointing on, and Trainer.train() would turn it on over the
    recipe's 'off' (Unsloth's CPU trainer does not undo it, as its GPU one does)."""
    _, model, *_ = dora_run
    assert model.is_gradient_checkpointing is False


def test_a_dora_adapter_reloads_with_its_trained_magnitudes(dora_run):
    recipe, _, _, after, trainable, run_dir = dora_run
    model, tokenizer = inference.load_adapter(run_dir / "adapter", recipe.model.max_seq_length)
    assert model.peft_config["default"].use_dora
    reloaded = dict(model.named_parameters())
    for name in trainable:
        assert torch.equal(reloaded[name].detach().to(after[name].dtype), after[name]), name
    assert inference.generate(model, tokenizer, "Reverse a string in Python.", max_new_tokens=4)


def test_gaussian_initialisation_reaches_peft():
    default = training.add_lora(training.load_model(smoke_recipe())[0], smoke_recipe())
    zero_b = [p for name, p in default.named_parameters() if "lora_B" in name]
    assert zero_b and all(torch.count_nonzero(p) == 0 for p in zero_b)  # PEFT's default: B = 0
    recipe = smoke_recipe("lora.init_lora_weights=gaussian")
    model = training.add_lora(training.load_model(recipe)[0], recipe)
    assert model.peft_config["default"].init_lora_weights == "gaussian"
    a = [p for name, p in model.named_parameters() if "lora_A" in name]
    # PEFT's gaussian: A ~ N(0, 1/r), B = 0.
    assert torch.cat([p.detach().flatten().float() for p in a]).std().item() == pytest.approx(
        1 / recipe.lora.r, rel=0.05
    )
