"""The GPU matrix in one command: our runner (Unsloth backend), a bare Unsloth + TRL script, and our
runner on the transformers backend, each next to our prediction for the same setting.

On a GPU it builds a Llama 3.1 8B-shaped model with random weights from the public config values
(finetune/models/configs; nothing is downloaded), saves it pre-quantized to NF4 as Unsloth's
`-bnb-4bit` repositories are, and for each setting (max_seq_length x micro-batch x LoRA rank) times
about ten steps after warm-up of each of the three, recording tokens/s, the median step time and
peak allocated and reserved memory. The headline setting runs first for all three, then the other
settings for our runner (the predictions' calibration points), cheapest first, then those for the
other two. Every result is appended to RESULTS/results.jsonl the moment it exists, with the tail of
each run's output in RESULTS/run_logs.txt, so a run cut short still leaves its data; the model, data and
run folders stay in OUT, which need not come back. --time-limit is a hard deadline from the start:
a run that the ones before it say cannot finish in time is skipped, one still going at the deadline
is killed with its process group. A table is printed at the end. `--rehearse` runs the same matrix
on the CPU with the tiny model and short lengths (benchmarks/rehearse_gpu.sh, in a reproduction of
the GPU image), so the script is known to work before a GPU minute is spent.

    python3 benchmarks/gpu_truth.py --out /tmp/work --results "$OUT" --time-limit 250
    python3 benchmarks/gpu_truth.py --rehearse --out /tmp/rehearsal --lengths 64 --batches 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.base.processes import child_setup  # noqa: E402  (no torch: the standard library only)

LENGTHS = {"gpu": (2048, 512, 8192), "rehearse": (128, 64, 256)}  # the first is the headline
BATCHES = (1, 4)
VARIANTS = ("runner", "bare", "transformers")
ROWS = 64  # enough rows for every step of the largest micro-batch
RUNNING: list[subprocess.Popen] = []  # the run in progress, killed with its group if this script is


def stop_the_running_run(signum, frame):
    """SIGTERM (the command's `timeout`) or SIGINT: the run in progress goes with all it started."""
    for process in RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def model_folder(out: Path, rehearse: bool) -> Path:
    return out / ("tiny-llama-3-shaped-bnb-4bit" if rehearse else "llama-3.1-8b-shaped-bnb-4bit")


def build_model(out: Path, rehearse: bool, seconds: float) -> Path:
    """The model every run loads, with random weights, saved pre-quantized to NF4 (double-quantized,
    bf16 compute) as Unsloth's `-bnb-4bit` repositories are: 8B-shaped on the GPU, the tiny model's
    shape in the rehearsal (the same code on the CPU). Built in a process of its own, so this one
    never holds GPU memory while the runs measure theirs (gpu_first_command.sh starts that process
    beside the import check, `--build-model`; then it is here already)."""
    folder = model_folder(out, rehearse)
    if not (folder / "config.json").is_file():
        command = [sys.executable, __file__, "--out", str(out), "--build-model"]
        subprocess.run(command + ["--rehearse"] * rehearse, cwd=ROOT, check=True, timeout=max(seconds, 1.0))
    return folder


def _build_model(out: Path, rehearse: bool) -> None:
    folder = model_folder(out, rehearse)
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from finetune.models.shapes import shipped_config
    from finetune.models.tiny_model import build_llama3_tokenizer, ensure_tiny_model

    tiny = LlamaConfig.from_pretrained(ensure_tiny_model())
    if rehearse:
        config, device = tiny, "cpu"
    else:
        public = shipped_config("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit")
        values = {k: v for k, v in public.items() if not k.startswith("_") and k != "quantization_config"}
        config, device = LlamaConfig(**values), "cuda"
        # Llama 3's special token ids, as the tiny model (and the tokenizer saved beside) has them.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, name, getattr(tiny, name))
    sixteen = folder.with_name(folder.name + "-16bit")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(sixteen)
    del model
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        sixteen, quantization_config=quantization, device_map={"": 0} if device == "cuda" else "cpu"
    )
    partial = folder.with_name(folder.name + ".partial")  # a build killed midway is not taken as done
    model.save_pretrained(partial)
    build_llama3_tokenizer().save_pretrained(partial)  # the real Llama 3 tokenizer and chat template
    partial.rename(folder)
    for file in sixteen.iterdir():  # 16 GB on the GPU, which the runs do not need
        file.unlink()
    sixteen.rmdir()


def gpu_name(rehearse: bool) -> str:
    """The card, from nvidia-smi: this process never initialises CUDA (its context would hold memory
    beside every measured run)."""
    if rehearse:
        return "CPU"
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"


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


def run_one(
    variant: str, model: Path, data: Path, setting: dict, steps: int, out: Path, env: dict, seconds: float
) -> dict:
    """One measured run in a fresh process, killed with its process group after ``seconds``; its
    measurements and our prediction for it. The tail of its output is kept in result["log"]."""
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
    # A session of its own: at the deadline the run and every process it started go (a worker left
    # behind would hold GPU memory into the next run). It dies with this script too (the device
    # tool ends a command's processes when it returns, but not those in a session of their own).
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=child_setup(),
    )
    RUNNING[:] = [process]
    try:
        output, _ = process.communicate(timeout=max(seconds, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\nkilled at the time limit after {time.perf_counter() - started:.0f} s"
        process.returncode = -signal.SIGKILL
    finally:
        RUNNING.clear()
    result = {**setting, "variant": variant, "seconds": time.perf_counter() - started, "log": output[-20000:]}
    if process.returncode != 0:
        return {**result, "error": output[-2000:] or f"exit {process.returncode}"}
    if variant == "bare":
        measured = bare_measurements(output)
        if measured is None:
            return {**result, "error": "no measurements in its output\n" + output[-2000:]}
        predicted = None
    else:
        (run_dir,) = (folder / "smoke").iterdir()
        record = json.loads((run_dir / "budget.json").read_text())
        measured, predicted = record["measured"], record["predicted"]
        measured["padding_free"] = json.loads((run_dir / "plan.json").read_text())["data"]["padding_free"]
        # Unsloth sets expandable segments when imported (unsloth_zoo); the transformers backend,
        # which never imports it, runs with PyTorch's default allocator, as its users get it.
        device = json.loads((run_dir / "manifest.json").read_text())["device"]
        measured["alloc_conf"] = device.get("allocator")
    tokens = length * batch  # rows are truncated to max_seq_length: every micro-batch is full
    step = measured["median_step_seconds"]
    result.update(
        tokens_per_second=tokens / step if step else None,
        median_step_seconds=step,
        step_seconds=measured["step_seconds"],
        peak_allocated_bytes=measured["peak_allocated_bytes"],
        peak_reserved_bytes=measured["peak_reserved_bytes"],
        padding_free=measured.get("padding_free"),
        alloc_conf=measured.get("alloc_conf"),
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


def bare_measurements(output: str) -> dict | None:
    """The JSON line bare_unsloth.py prints last, found from the end: compile workers share the
    output and may print after it."""
    for line in reversed(output.splitlines()):
        if line.startswith("{") and "median_step_seconds" in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def environment(model: Path, argv: list[str], rehearse: bool) -> dict:
    """What the results were measured on and with, for docs/benchmarks.md."""
    from importlib.metadata import PackageNotFoundError, version

    from finetune.plan.constants import CONSTANTS

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "gpu": gpu_name(rehearse),
        "versions": versions,
        "command": "python benchmarks/gpu_truth.py " + " ".join(argv),
        "model": str(model),
        "constants": {name: value for name, (value, _) in CONSTANTS.items()},  # those the predictions used
    }


def matrix(lengths, batches, ranks, variants) -> list[tuple[str, dict]]:
    """The runs in the order they are worth having when time runs out: the headline setting (the
    first length, the largest micro-batch, the first rank) for every variant, side by side; then the
    other settings for our runner, cheapest first (its predictions' calibration points); then the
    same for the other variants."""
    headline = {"max_seq_length": lengths[0], "batch": max(batches), "rank": ranks[0]}
    settings = [{"max_seq_length": n, "batch": b, "rank": ranks[0]} for n in lengths for b in batches]
    settings += [{"max_seq_length": lengths[0], "batch": b, "rank": r} for r in ranks[1:] for b in batches]
    others = sorted(
        (s for s in settings if s != headline), key=lambda s: (s["max_seq_length"] * s["batch"], s["rank"])
    )
    runs = [(variant, headline) for variant in variants]
    runs += [("runner", s) for s in others if "runner" in variants]
    runs += [(variant, s) for variant in variants if variant != "runner" for s in others]
    return runs


def expected_seconds(variant: str, setting: dict, steps: int, done: list[dict]) -> float:
    """How long a run should take, from the finished ones: the same variant's start-up (imports,
    loading, and its first two steps, which carry the compiles) plus its other steps scaled by tokens
    per step; before any, the slowest whole run seen, or 30 s."""
    tokens = setting["max_seq_length"] * setting["batch"]
    measured = [r for r in done if "error" not in r and r.get("median_step_seconds")]
    same = [r for r in measured if r["variant"] == variant]
    if not same:
        return max((r["seconds"] for r in measured), default=30.0)
    last = same[-1]
    startup = last["seconds"] - sum(last["step_seconds"][2:])
    per_token = last["median_step_seconds"] / (last["max_seq_length"] * last["batch"])
    return startup + 1.2 * max(steps - 2, 0) * per_token * tokens


# pf: padding-free batching (flattened micro-batches) or padded ones, which on torch >= 2.11 Unsloth
# compiles block by block (unsloth/utils/padding_choice.py); None: left to Unsloth, who decides later.
PADDING_FREE_MARK = {True: "yes", False: "no", None: "auto"}


def table(results: list[dict]) -> list[str]:
    lines = [
        f"{'variant':<13} {'seq':>5} {'mb':>3} {'r':>3} {'tok/s':>9} {'step s':>8} {'pred s':>8}"
        f" {'alloc GiB':>9} {'resv GiB':>9} {'pred GiB':>9} {'pf':>3}"
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
            f" {PADDING_FREE_MARK.get(r.get('padding_free'), '?'):>3}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, data and runs")
    parser.add_argument("--results", type=Path, help="folder for the small results (default: --out)")
    parser.add_argument(
        "--time-limit", type=float, default=250, help="seconds from the start, a hard deadline"
    )
    parser.add_argument("--rehearse", action="store_true", help="the CPU, the tiny model, short lengths")
    parser.add_argument("--lengths", type=int, nargs="+", help="max_seq_length values (first: headline)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="the first for every length")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (2 are warm-up)")
    parser.add_argument("--build-model", action="store_true", help="build the model into --out, only")
    args = parser.parse_args(argv)
    if args.build_model:
        _build_model(args.out, args.rehearse)
        return 0
    deadline = time.monotonic() + args.time_limit
    results_dir = args.results or args.out
    for folder in (args.out, results_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_the_running_run)
    mode = "rehearse" if args.rehearse else "gpu"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.monotonic()
    try:
        model = build_model(args.out, args.rehearse, deadline - time.monotonic())
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as failure:
        print(f"the model was not built: {failure}", flush=True)
        return 1
    setup = environment(model, sys.argv[1:] if argv is None else argv, args.rehearse)
    setup["model_build_seconds"] = time.monotonic() - started
    (results_dir / "environment.json").write_text(json.dumps(setup, indent=1))
    print(f"model ready in {setup['model_build_seconds']:.0f} s: {model}", flush=True)
    lengths = args.lengths or list(LENGTHS[mode])
    data = {n: write_data(args.out, n) for n in lengths}
    results_file = results_dir / "results.jsonl"
    results: list[dict] = []
    for variant, setting in matrix(lengths, args.batches, args.ranks, args.variants):
        left = deadline - time.monotonic()
        expected = expected_seconds(variant, setting, args.steps, results)
        if expected > left:
            print(f"time limit: skipped {variant} {setting} (expected {expected:.0f} s, {left:.0f} s left)")
            continue
        result = run_one(
            variant, model, data[setting["max_seq_length"]], setting, args.steps, args.out, env, left
        )
        name = f"{variant}-{setting['max_seq_length']}-{setting['batch']}-r{setting['rank']}"
        with (results_dir / "run_logs.txt").open("a") as logs:  # one file: the device tool returns 8
            logs.write(
                f"===== {name} (exit {'error' if 'error' in result else 0}) =====\n{result.pop('log')}\n"
            )
        results.append(result)
        with results_file.open("a") as out:
            out.write(json.dumps(result) + "\n")
        print(
            json.dumps({k: v for k, v in result.items() if k not in ("step_seconds", "predicted")}),
            flush=True,
        )
    print("\n".join(table(results)))
    (results_dir / "table.txt").write_text("\n".join(table(results)) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
