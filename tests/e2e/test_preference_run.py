"""Preference tuning on the real stack (Unsloth's CPU path, TRL's DPO, KTO, ORPO and CPO trainers):
our DPO loss is the sigmoid DPO loss of the model's log-probabilities with the adapter on and off,
the trained adapter prefers the chosen answers more than the base does, KTO trains from unpaired
labels, a DPO run killed with SIGKILL, run out of memory or stopped with Ctrl-C resumes to the same
losses and adapter, TensorBoard holds its rewards, and its GGUF carries the trained adapter."""

import importlib.util
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, runner
from safetensors.torch import load_file
from test_lifecycle import ENV, logged, resume, run_folder, start, wait_for

from finetune.data.store import prepared_data
from finetune.recipe.schema import load_recipe
from finetune.runs.run_folder import SEAL
from finetune.train import preference, training

SAMPLES = ROOT / "data_samples"
_spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "benchmarks" / "docs_figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)
# The smoke recipe (tiny Llama 3, lr 1e-2) tuned with DPO on the code preference pairs: the run
# docs/preference.md quotes.
DPO = figures.DPO_RUN


def in_process(*overrides: str):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", list(overrides))
    model, tokenizer = training.load_model(recipe)
    model = training.add_lora(model, recipe)
    return recipe, model, tokenizer, prepared_data(recipe)


def answer_logps(model, ids: torch.Tensor, mask: torch.Tensor, attention=None) -> torch.Tensor:
    """Each row's summed log-probability of its masked-in tokens (the answer), from full logits."""
    with torch.no_grad():
        attention = torch.ones_like(ids) if attention is None else attention
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * mask[:, 1:]).sum(-1)


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory):
    recipe, model, tokenizer, store = in_process(
        "train.method=dpo", f"data.train={SAMPLES / 'code_preference.jsonl'}", "train.beta=0.5"
    )
    trainer = training.build_trainer(
        model, tokenizer, store.dataset("train"), recipe, tmp_path_factory.mktemp("dpo")
    )
    # TRL keeps a frozen copy of the adapter as it was when training began ("ref"): a new adapter,
    # B = 0, so the reference is the base. Then the adapter moves (as training would move it).
    assert model.peft_config.keys() == {"default", "ref"}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                assert not p.any()
                p.normal_(0, 0.05)
    return recipe, model, trainer


def test_our_dpo_loss_is_the_sigmoid_loss_of_the_log_probabilities_with_the_adapter_on_and_off(dpo_trainer):
    recipe, model, trainer = dpo_trainer
    assert isinstance(trainer, preference.FinetuneDPOTrainer)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, inputs))
    ids, mask, attention = inputs["input_ids"], inputs["completion_mask"], inputs["attention_mask"]
    policy = answer_logps(model, ids, mask, attention)
    with model.disable_adapter():
        reference = answer_logps(model, ids, mask, attention)
    chosen, rejected = (policy - reference).chunk(2)
    expected = float(-torch.nn.functional.logsigmoid(0.5 * (chosen - rejected)).mean())
    assert not math.isclose(expected, math.log(2), rel_tol=1e-3)  # the adapter moved the policy
    # bfloat16 on an AMX CPU (the manifest's compute dtype): TRL's chunked log-softmax and ours differ there.
    tolerance = 2e-2 if model.dtype == torch.bfloat16 else 1e-4
    assert loss == pytest.approx(expected, rel=tolerance)


def test_the_trainer_sees_the_tokens_the_store_prepared(dpo_trainer):
    recipe, _, trainer = dpo_trainer
    stored = prepared_data(recipe).dataset("train")[0]
    given = trainer.train_dataset[0]
    n = stored["prompt_length"]
    assert given["prompt_ids"] == stored["input_ids"][:n]
    assert given["chosen_ids"] == stored["input_ids"][n:]
    assert given["rejected_ids"] == stored["rejected_ids"]
    assert stored["labels"][:n] == [-100] * n and stored["labels"][n:] == given["chosen_ids"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("dpo-run")
    whole = start(*DPO, output=output)
    out, err = whole.communicate()
    assert whole.returncode == 0, err[-3000:]
    return run_folder(output), out


def trained_and_base(run_dir, *overrides):
    """The tiny model with the run's adapter loaded, and the store of the run's data."""
    recipe, model, tokenizer, store = in_process(*overrides)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    return model, tokenizer, store


def test_a_dpo_run_makes_the_chosen_answers_likelier_and_the_rejected_less_likely(dpo_run):
    run_dir, out = dpo_run
    losses = logged(run_dir, "loss")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as its reference
    model, _, store = trained_and_base(run_dir, *DPO[1:3])
    gains = {"chosen": [], "rejected": []}
    for row in store.dataset("train"):
        n = row["prompt_length"]
        for side, answer in (("chosen", row["input_ids"][n:]), ("rejected", row["rejected_ids"])):
            ids = torch.tensor([row["input_ids"][:n] + answer])
            mask = torch.tensor([[0] * n + [1] * len(answer)])
            trained = answer_logps(model, ids, mask)
            with model.disable_adapter():
                base = answer_logps(model, ids, mask)
            gains[side].append(float(trained - base))
    # Each answer's log-probability under the trained adapter against the base's (the reference),
    # over all 24 pairs: most chosen answers rose, most rejected ones fell (23 of 24 each here).
    assert sum(g > 0 for g in gains["chosen"]) >= 0.75 * len(gains["chosen"]), gains
    assert sum(g < 0 for g in gains["rejected"]) >= 0.75 * len(gains["rejected"]), gains
    assert sum(gains["chosen"]) > 0 > sum(gains["rejected"]), gains
    # The schedule the plan previewed is the one the DPO trainer stepped through.
    planned = json.loads((run_dir / "plan.json").read_text())["lr_per_step"]
    assert list(logged(run_dir, "learning_rate").values()) == pytest.approx(planned, rel=1e-12)
    assert "rewards (train, first -> last logged step)" in out
    quoted = figures.block(ROOT / "docs" / "preference.md", "dpo-run")
    fresh = figures.preference_run_lines(out)
    assert figures.same_within(quoted, fresh), (
        f"run `make docs`: the docs quote {quoted}, a run prints {fresh}"
    )
    assert (run_dir / "preference.png").is_file()
    assert "![rewards, margin and accuracy](preference.png)" in (run_dir / "report.md").read_text()


def test_tensorboard_holds_the_rewards_the_run_logged(dpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = dpo_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        board = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert board == pytest.approx(logged(run_dir, key), rel=1e-6), key
    assert len(board) == 8


def test_the_gguf_of_a_dpo_run_carries_the_trained_adapter_not_the_reference(dpo_run):
    """TRL's reference is a second adapter of the same model; an export that merged it (or both, or
    neither) would ship the base model. The GGUF's weights are the 16-bit base's (the tiny model is
    one) plus the trained adapter's alpha/r * B @ A, within q8_0's rounding, which is far smaller
    than the adapter's change. (v_proj: the converter permutes q and k, not v.)"""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from finetune.models.tiny_model import tiny_model_dir

    run_dir, _ = dpo_run
    done = runner("export", str(run_dir), "--format", "gguf", env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    reader = GGUFReader(run_dir / "gguf" / "smoke-q8_0.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert tensor.tensor_type.name == "Q8_0"
    in_gguf = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    base = load_file(str(tiny_model_dir() / "model.safetensors"))["model.layers.0.self_attn.v_proj.weight"]
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora = "base_model.model.model.layers.0.self_attn.v_proj.lora_{}.weight"
    delta = 2.0 * (adapter[lora.format("B")].float() @ adapter[lora.format("A")].float())  # alpha/r: 16/8
    trained = base.float() + delta
    rounding = (in_gguf - trained).abs().max()
    assert rounding <= trained.abs().max() / 100  # q8_0: 1/127 of each 32-block's largest weight
    assert delta.abs().max() > 5 * rounding  # so the GGUF tells the trained weights from the base's
    assert 'PARAMETER stop "<|eot_id|>"' in (run_dir / "gguf" / "Modelfile").read_text()


def test_a_dpo_run_killed_with_sigkill_resumes_to_the_same_losses_and_adapter(dpo_run, tmp_path):
    expected, _ = dpo_run
    killed = start(*DPO, output=tmp_path)
    wait_for(lambda: list(tmp_path.glob(f"smoke/*/checkpoints/checkpoint-4/{SEAL}")), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run_dir = run_folder(tmp_path)
    assert not (run_dir / "adapter").exists()
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    for key in ("loss", "rewards/margins", "logps/chosen", "learning_rate"):
        assert logged(run_dir, key) == logged(expected, key), key
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(expected / "adapter" / "adapter_model.safetensors"))
    assert all(adapter[name].equal(reference[name]) for name in reference)


def test_a_dpo_run_out_of_memory_then_stopped_with_ctrl_c_resumes_each_time_to_the_same_losses(
    dpo_run, tmp_path
):
    """The out-of-memory report saves the last sound step; Ctrl-C stops after a step with a
    checkpoint; each is saved by the DPO trainer's own save (the trained adapter, not TRL's
    reference) and resumed from, and the run ends where the uninterrupted one did."""
    expected, _ = dpo_run
    out = runner(*DPO, f"output.dir={tmp_path}", env=ENV, env_extra={"FINETUNE_INJECT_FAULT": "oom@3"})
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: out of memory at step 3 (" in " ".join(out.stderr.split())
    run_dir = run_folder(tmp_path)
    assert (run_dir / "checkpoints" / "checkpoint-2" / SEAL).is_file()

    resumed = subprocess.Popen(
        [sys.executable, "runner.py", "resume", str(run_dir)],
        cwd=ROOT,
        env={**ENV, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: max(logged(run_dir, "loss"), default=0) >= 3, resumed)
    resumed.send_signal(signal.SIGINT)
    _, stderr = resumed.communicate(timeout=120)
    stopped = max(logged(run_dir, "loss"))
    assert resumed.returncode == 130 and stopped < 8, stderr[-3000:]
    assert f"stopped after step {stopped} with a checkpoint" in stderr

    finished = resume(run_dir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming from checkpoint-{stopped}" in finished.stdout
    for key in ("loss", "rewards/margins", "logps/rejected", "learning_rate"):
        assert logged(run_dir, key) == logged(expected, key), key
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(expected / "adapter" / "adapter_model.safetensors"))
    assert all(adapter[name].equal(reference[name]) for name in reference)


def test_kto_trains_from_unpaired_labels(tmp_path):
    run = start(
        "recipes/smoke.yaml", "train.method=kto", f"data.train={SAMPLES / 'code_unpaired.jsonl'}",
        "train.max_steps=4", "output.samples=0", output=tmp_path,
    )  # fmt: skip
    out, err = run.communicate()
    assert run.returncode == 0, err[-3000:]
    run_dir = run_folder(tmp_path)
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any("kl" in entry for entry in entries)  # KTO's KL term, from the mismatched completions
    assert any("rewards/chosen" in entry or "rewards/rejected" in entry for entry in entries)
    rows = prepared_data(
        load_recipe(
            ROOT / "recipes" / "smoke.yaml",
            ["train.method=kto", f"data.train={SAMPLES / 'code_unpaired.jsonl'}"],
        )
    ).dataset("train")
    assert set(rows["label"]) == {True, False}
    assert "unpaired rows:" not in out  # the audit's line, not the run's
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("method", "backend"), [("orpo", "unsloth"), ("simpo", "unsloth"), ("orpo", "transformers")]
)
def test_orpo_and_simpo_from_trl_experimental_train_on_our_tokens(method, backend, tmp_path):
    """TRL 1.15 keeps ORPO and CPO in trl.experimental, whose __init__ maps tokenize_row over the
    rows: ours must be what it trains on (the prompt masked out of each answer's labels), on
    Unsloth and on the transformers backend (without Unsloth), whose LoRA weights all move."""
    recipe, model, tokenizer, store = in_process(
        f"model.backend={backend}",
        f"train.method={method}",
        f"data.train={SAMPLES / 'code_preference.jsonl'}",
        "train.max_steps=4",
        "train.warmup_steps=1",
    )
    trainer = training.build_trainer(model, tokenizer, store.dataset("train"), recipe, tmp_path)
    theirs = {"orpo": "trl.experimental.orpo.orpo_trainer", "simpo": "trl.experimental.cpo.cpo_trainer"}
    assert theirs[method] in {cls.__module__ for cls in type(trainer).__mro__}
    stored, given = store.dataset("train")[0], trainer.train_dataset[0]
    n = stored["prompt_length"]
    assert given["chosen_input_ids"] == stored["input_ids"]
    assert given["chosen_labels"] == [-100] * n + stored["input_ids"][n:]
    assert given["rejected_input_ids"] == stored["input_ids"][:n] + stored["rejected_ids"]
    assert "prompt_ids" not in given
    if method == "simpo":
        assert trainer.loss_type == "simpo" and trainer.args.cpo_alpha == 0.0 and trainer.beta == 2.0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 4
    after = dict(model.named_parameters())
    assert before and all(not after[n].equal(p) for n, p in before.items())


def test_dpo_after_sft_starts_from_the_runs_adapter_keeps_it_as_the_reference_probes_and_records_it(
    finished_run, tmp_path
):
    recipe, model, tokenizer, store = in_process(*DPO[1:3], f"model.adapter={finished_run}")
    sft = load_file(str(finished_run / "adapter" / "adapter_model.safetensors"))
    mine = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sft.keys() <= mine.keys() and all(mine[k].equal(sft[k].to(mine[k].dtype)) for k in sft)
    trainer = training.build_trainer(model, tokenizer, store.dataset("train"), recipe, tmp_path / "t")
    reference = {k.replace(".ref", ""): v for k, v in model.state_dict().items() if ".ref." in k}
    assert all(reference[k].equal(sft[k].float()) for k in sft)  # the reference is the SFT model
    del trainer

    # The probe runs the DPO trainer first (and removes its own reference copy): the run's reference
    # is still the SFT adapter, so its first loss is log 2.
    run = start(
        *DPO, "train.max_steps=2", "train.warmup_steps=1", f"model.adapter={finished_run}", "--probe",
        output=tmp_path,
    )  # fmt: skip
    out, err = run.communicate()
    assert run.returncode == 0, err[-3000:]
    assert "probe: 3 steps on the worst-case micro-batch" in out
    run_dir = run_folder(tmp_path)
    assert logged(run_dir, "loss")[1] == pytest.approx(math.log(2), abs=1e-3)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    lineage = manifest["start_adapter"]
    assert lineage["run"] == str(finished_run) and lineage["recipe"] == "smoke 1.0.0"
    assert "start adapter" in manifest["fingerprints"]
    changed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert not all(changed[k].equal(sft[k]) for k in sft)  # DPO moved it on
    assert not (run_dir / "adapter" / "ref").exists()  # the reference is training's, not the result's
