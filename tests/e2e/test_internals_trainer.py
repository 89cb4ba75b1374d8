"""The trainer-side entries of finetune/internals.py, one test each, named after the API."""

import inspect

from finetune import internals


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
