"""The trainer-side entries of finetune/base/internals.py, one test each, named after the API."""

import inspect

from finetune.base import internals


def test_transformers_Trainer_save_checkpoint_takes_model_and_trial():
    from transformers import Trainer

    parameters = list(inspect.signature(Trainer._save_checkpoint).parameters)
    assert parameters[:3] == ["self", "model", "trial"]

    class Recorder:  # what save_checkpoint_now hands the method
        model = object()

        def _save_checkpoint(self, model, trial):
            self.called = (model, trial)

    trainer = Recorder()
    internals.save_checkpoint_now(trainer)
    assert trainer.called == (Recorder.model, None)


def test_transformers_ProgressCallback_training_bar(tmp_path):
    from transformers import ProgressCallback, TrainerControl, TrainerState, TrainingArguments

    callback = ProgressCallback()
    assert internals.progress_bar(callback) is None  # before training
    state = TrainerState(max_steps=3, is_world_process_zero=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback.on_train_begin(args, state, TrainerControl())
    bar = internals.progress_bar(callback)
    assert bar is not None and hasattr(bar, "write") and bar.total == 3
    callback.on_train_end(args, state, TrainerControl())
    assert internals.progress_bar(callback) is None


def test_transformers_PreTrainedModel_weight_conversions(tmp_path, four_bit_tiny_model_dir):
    """After dequantize() the model still lists bitsandbytes' deserialization, which save_pretrained
    cannot reverse; once it is forgotten the plain weights save and load back unchanged."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_bit_tiny_model_dir, device_map="cpu").dequantize()
    with pytest.raises(NotImplementedError):
        model.save_pretrained(tmp_path / "as-is")
    internals.forget_quantized_loading(model)
    model.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_transformers_Trainer_load_optimizer_and_scheduler_maps_to_args_device():
    """While the trainer maps a resumed optimizer state to args.device under several processes,
    and torch.load cannot restore to a 'cpu:N' device, a resume on the CPU under torchrun needs
    internals.cpu_map_location (tests/e2e/test_torchrun.py resumes through it)."""
    import io

    import pytest
    import torch
    from transformers import Trainer

    source = inspect.getsource(Trainer._load_optimizer_and_scheduler)
    assert "map_location = self.args.device if self.args.world_size > 1" in source
    saved = io.BytesIO()
    torch.save({"exp_avg": torch.ones(3)}, saved)
    saved.seek(0)
    with pytest.raises(RuntimeError, match="restore data location"):
        torch.load(saved, map_location=torch.device("cpu", 0), weights_only=True)
    saved.seek(0)
    with internals.cpu_map_location():
        state = torch.load(saved, map_location=torch.device("cpu", 0), weights_only=True)
    assert state["exp_avg"].sum() == 3 and torch.load is not None
    assert torch.load.__name__ == "load"  # put back afterwards


def test_bitsandbytes_Linear4bit_support_avx512bf16_for_cpu():
    """A 4-bit layer's eval forward on the CPU leaves its weight and quantization state as loaded once
    keep_4bit_layout turned the repacking off. Where the CPU has AVX512-BF16 the same forward without
    it does repack (the state's nested absmax dequantized), which is what changed training after the
    samples and broke exact resume."""
    import bitsandbytes as bnb
    import torch

    def layer():
        torch.manual_seed(0)
        linear = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.float32, quant_type="nf4")
        linear.weight = bnb.nn.Params4bit(
            torch.randn(256, 256) * 0.1, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        return linear.to("cpu").eval()  # quantizes

    kept = layer()
    assert hasattr(kept, "support_avx512bf16_for_cpu")
    internals.keep_4bit_layout(torch.nn.Sequential(kept))
    before = (kept.weight.data.clone(), kept.weight.quant_state.absmax.clone())
    with torch.no_grad():
        kept(torch.randn(2, 256))
    assert not getattr(kept.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(kept.weight.data, before[0]) and torch.equal(kept.weight.quant_state.absmax, before[1])
    repacking = layer()
    if repacking.support_avx512bf16_for_cpu:  # this CPU has the fast path the fix turns off
        with torch.no_grad():
            repacking(torch.randn(2, 256))
        assert getattr(repacking.weight.quant_state, "packing_format_for_cpu", False)
