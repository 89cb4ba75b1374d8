"""The GPU matrix in one command: our runner (Unsloth backend), a bare Unsloth + TRL script, and our
runner on the transformers backend, each next to our prediction for the same setting.

On a GPU it builds a Llama 3.1 8B-shaped model with random weights from the public config values
(finetune/model_configs; nothing is downloaded), saves it pre-quantized to NF4 as Unsloth's
`-bnb-4bit` repositories are, and for each setting (max_seq_length x micro-batch x LoRA rank) times
about ten steps after warm-up of each of the three, recording tokens/s, the median step time and
peak allocated and reserved memory. Every result is appended to OUT/results.jsonl the moment it
exists, so a run cut short by --time-limit (or the machine) still leaves its data; a table is
printed at the end. `--rehearse` runs the same matrix on the CPU with the tiny model and short
lengths, so the script is known to work before a GPU minute is spent.

    python benchmarks/gpu_truth.py --out results/ --time-limit 480
    python benchmarks/gpu_truth.py --rehearse --out /tmp/rehearsal --lengths 64 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTHS = {"gpu": (2048, 512, 8192), "rehearse": (128, 64, 256)}  # the first is the headline
BATCHES = (1, 4)
VARIANTS = ("runner", "bare", "transformers")
ROWS = 64  # enough rows for every step of the largest micro-batch


def build_model(out: Path, rehearse: bool) -> Path:
    """The model every run loads: the tiny one, or an 8B-shaped random one saved in NF4."""
    from finetune.tiny_model import build_llama3_tokenizer, ensure_tiny_model

    if rehearse:
        return ensure_tiny_model()
    folder = out / "llama-3.1-8b-shaped-bnb-4bit"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from finetune.shapes import shipped_config

    public = shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit")
    values = {k: v for k, v in public.items() if not k.startswith("_") and k != "quantization_config"}
    sixteen = out / "llama-3.1-8b-shaped"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**values), dtype=torch.bfloat16)
    model.save_pretrained(sixteen)
    del model
    torch.cuda.empty_cache()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        sixteen, quantization_config=quantization, device_map={"": 0}
    )
    model.save_pretrained(folder)
    build_llama3_tokenizer().save_pretrained(folder)  # the real Llama 3 tokenizer and chat template
    for file in sixteen.iterdir():  # 16 GB the runs do not need
        file.unlink()
    sixteen.rmdir()
    del model
    torch.cuda.empty_cache()
    return folder


def write_data(out: Path, length: int) -> Path:
    """ROWS conversations each longer than ``length`` tokens (truncated to it by the runs)."""
    path = out / f"data-{length}.jsonl"
    code = "".join(f"    total = total + {k} * x  # step {k}\n" for k in range(length // 8 + 8))
    with path.open("w") as rows:
        for k in range(ROWS):
            user = {"role": "user", "content": f"Write function number {k} that sums a series."}
            reply = {
                "role": "assistant",
                "content": f"def series_{k}(x):\n    total = 0\n{code}    return total\n",
            }
            rows.write(json.dumps({"messages": [user, reply]}) + "\n")
    return path


def runner_overrides(model: Path, data: Path, length: int, batch: int, rank: int, steps: int, out: Path):
    return [
        f"model.name={model}",
        f"model.max_seq_length={length}",
        f"lora.r={rank}",
        f"lora.alpha={rank}",
        f"data.train={data}",
        "data.overlong=truncate",
        f"train.per_device_train_batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={steps}",
        "train.warmup_steps=1",
        "train.learning_rate=2e-4",
        f"train.save_steps={steps}",
        "output.samples=0",
        f"output.dir={out}",
    ]


def run_one(variant: str, model: Path, data: Path, setting: dict, steps: int, out: Path, env: dict) -> dict:
    """One measured run in a fresh process; its measurements and our prediction for it."""
    length, batch, rank = setting["max_seq_length"], setting["batch"], setting["rank"]
    folder = out / "runs" / f"{variant}-{length}-{batch}-r{rank}"
    started = time.perf_counter()
    if variant == "bare":
        command = [sys.executable, str(ROOT / "benchmarks" / "bare_unsloth.py"), "--model", str(model)]
        command += ["--data", str(data), "--max-seq-length", str(length), "--batch", str(batch)]
        command += ["--rank", str(rank), "--steps", str(steps), "--output", str(folder)]
    else:
        overrides = runner_overrides(model, data, length, batch, rank, steps, folder)
        if variant == "transformers":
            overrides.append("model.backend=transformers")
        command = [sys.executable, str(ROOT / "runner.py"), "recipes/smoke.yaml", *overrides]
        command += ["--no-probe", "--force"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    result = {**setting, "variant": variant, "seconds": time.perf_counter() - started}
    if done.returncode != 0:
        return {**result, "error": (done.stderr or done.stdout)[-2000:]}
    if variant == "bare":
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        predicted = None
    else:
        (run_dir,) = (folder / "smoke").iterdir()
        record = json.loads((run_dir / "budget.json").read_text())
        measured, predicted = record["measured"], record["predicted"]
    tokens = length * batch  # rows are truncated to max_seq_length: every micro-batch is full
    step = measured["median_step_seconds"]
    result.update(
        tokens_per_second=tokens / step if step else None,
        median_step_seconds=step,
        step_seconds=measured["step_seconds"],
        peak_allocated_bytes=measured["peak_allocated_bytes"],
        peak_reserved_bytes=measured["peak_reserved_bytes"],
    )
    if predicted is not None:
        result.update(
            predicted_step_seconds=predicted["step_seconds"],
            predicted_memory_bytes=predicted["memory_total_bytes"],
            predicted_tokens_per_micro_batch=predicted["tokens_per_micro_batch"],
            gradient_accumulation_steps=1,
            predicted=predicted,  # every term, for benchmarks/fit_constants.py
        )
    return result


def environment(model: Path, argv: list[str], rehearse: bool) -> dict:
    """What the results were measured on and with, for docs/benchmarks.md."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from finetune.budget import CONSTANTS

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not rehearse else "CPU"
    return {
        "gpu": gpu,
        "versions": versions,
        "command": "python benchmarks/gpu_truth.py " + " ".join(argv),
        "model": str(model),
        "constants": {name: value for name, (value, _) in CONSTANTS.items()},  # those the predictions used
    }


def matrix(lengths, batches, ranks) -> list[dict]:
    settings = [
        {"max_seq_length": n, "batch": b, "rank": r} for r in ranks[:1] for n in lengths for b in batches
    ]
    settings += [{"max_seq_length": lengths[0], "batch": b, "rank": r} for r in ranks[1:] for b in batches]
    return settings


def table(results: list[dict]) -> list[str]:
    lines = [
        f"{'variant':<13} {'seq':>5} {'mb':>3} {'r':>3} {'tok/s':>9} {'step s':>8} {'pred s':>8}"
        f" {'alloc GiB':>9} {'resv GiB':>9} {'pred GiB':>9}"
    ]

    def fmt(value, width: int, digits: int, scale: float = 1.0) -> str:
        return f"{'-':>{width}}" if value is None else f"{value / scale:{width}.{digits}f}"

    gib = 2**30
    for r in results:
        head = f"{r['variant']:<13} {r['max_seq_length']:>5} {r['batch']:>3} {r['rank']:>3}"
        if "error" in r:
            lines.append(f"{head}  error: {r['error'].strip().splitlines()[-1][:60]}")
            continue
        lines.append(
            f"{head} {fmt(r['tokens_per_second'], 9, 0)} {fmt(r['median_step_seconds'], 8, 3)}"
            f" {fmt(r.get('predicted_step_seconds'), 8, 3)} {fmt(r['peak_allocated_bytes'], 9, 2, gib)}"
            f" {fmt(r['peak_reserved_bytes'], 9, 2, gib)} {fmt(r.get('predicted_memory_bytes'), 9, 2, gib)}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, data and results")
    parser.add_argument("--time-limit", type=float, default=480, help="seconds; no run starts after")
    parser.add_argument("--rehearse", action="store_true", help="the CPU, the tiny model, short lengths")
    parser.add_argument("--lengths", type=int, nargs="+", help="max_seq_length values (first: headline)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="the first for every length")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (2 are warm-up)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "rehearse" if args.rehearse else "gpu"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""
    model = build_model(args.out, args.rehearse)
    setup = environment(model, sys.argv[1:] if argv is None else argv, args.rehearse)
    (args.out / "environment.json").write_text(json.dumps(setup, indent=1))
    lengths = args.lengths or list(LENGTHS[mode])
    data = {n: write_data(args.out, n) for n in lengths}
    results_file = args.out / "results.jsonl"
    results, longest = [], 0.0
    for setting in matrix(lengths, args.batches, args.ranks):
        for variant in args.variants:
            elapsed = time.monotonic() - start
            if elapsed + max(longest, 30.0) > args.time_limit:
                print(f"time limit: stopped before {variant} {setting} ({elapsed:.0f} s used)", flush=True)
                break
            result = run_one(
                variant, model, data[setting["max_seq_length"]], setting, args.steps, args.out, env
            )
            longest = max(longest, result["seconds"])
            results.append(result)
            with results_file.open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}), flush=True)
        else:
            continue
        break
    print("\n".join(table(results)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
