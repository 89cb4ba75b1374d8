"""Export from a pre-quantized 4-bit base, offline: the GPU recipes' case (their model is a
`-bnb-4bit` checkpoint), where Unsloth's own merge would download the 16-bit original or raise."""

import json

import torch
from cli_helpers import runner


def test_offline_a_four_bit_base_is_merged_dequantized_and_the_merge_computes_what_the_adapter_does(
    tmp_path, four_bit_tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = four_bit_tiny_model_dir
    assert "quantization_config" in json.loads((base_dir / "config.json").read_text())
    trained = runner(
        "recipes/smoke.yaml",
        f"model.name={base_dir}",
        "train.max_steps=4",
        "output.samples=0",
        f"output.dir={tmp_path / 'runs'}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "smoke").iterdir()

    exported = runner("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr[-3000:]
    said = f"export: merged into {base_dir} dequantized to 16 bits, the weights the adapter was trained"
    assert said in " ".join(exported.stdout.split())
    merged_dir = run_dir / "merged"
    assert said.removeprefix("export: ") in " ".join((merged_dir / "README.md").read_text().split())
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config  # plain 16-bit weights, loadable without bitsandbytes

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu")
    adapted = PeftModel.from_pretrained(four_bit, run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = merged(ids).logits.float(), adapted(ids).logits.float()
        with adapted.disable_adapter():
            plain = adapted(ids).logits.float()
    # bf16 rounding of the merged weights; the adapter's effect is far larger than that.
    assert (got - want).abs().max() < 0.4
    assert (plain - want).abs().max() > 2 * (got - want).abs().max()
