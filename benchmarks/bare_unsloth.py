"""A minimal Unsloth + TRL training script, the way Unsloth's notebooks write one, for measuring our
runner against (benchmarks/gpu_truth.py runs it with the runner's settings). It loads, adds LoRA,
renders the chat rows with the tokenizer's template, trains with SFTTrainer and prints one JSON line
of measurements. Of finetune/ it uses only gpu_memory.py (torch alone), so that its peak memory is
measured exactly as the runner's is.

Unsloth is imported before datasets, transformers and TRL, as in its notebooks: on a GPU, importing
it replaces trl.SFTTrainer and trl.SFTConfig with classes it generates (unsloth/models/rl.py), and a
name bound by an earlier `from trl import SFTTrainer` would keep TRL's own trainer (its bf16 cast of
LoRA weights on a 4-bit base, its fused LM head): the baseline would not be Unsloth's.
tests/test_import_order.py holds every script that trains to this.

    python benchmarks/bare_unsloth.py --model DIR --data FILE.jsonl --max-seq-length 2048 \\
        --batch 4 --rank 16 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # finetune/train/gpu_memory.py

import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402  (before what it patches, as Unsloth asks)

# isort: split
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from finetune.train.gpu_memory import read_peak_memory, reset_peak_memory  # noqa: E402


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-seq-length", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--alpha", type=int, help="LoRA alpha (default: the rank)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--save-steps", type=int, help="checkpoints every N steps (default: none)")
    parser.add_argument("--save-total-limit", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=args.max_seq_length, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=args.alpha or args.rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=args.seed,
        max_seq_length=args.max_seq_length,
    )
    with open(args.data) as rows:
        texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in rows]
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"text": texts}),
        args=SFTConfig(
            output_dir=args.output,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            lr_scheduler_type="cosine",
            optim="adamw_8bit",
            max_length=args.max_seq_length,
            logging_steps=1,
            save_strategy="steps" if args.save_steps else "no",
            save_steps=args.save_steps or 500,
            save_total_limit=args.save_total_limit,
            report_to="none",
            seed=args.seed,
        ),
    )
    timer = StepTimes()
    trainer.add_callback(timer)
    reset_peak_memory()  # as the runner does (train._timed_train): loading's cache freed first
    loop_started = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - loop_started
    peak_allocated, peak_reserved = read_peak_memory()  # the loop's, as the runner's: before saving
    model.save_pretrained(f"{args.output}/adapter")
    tokenizer.save_pretrained(f"{args.output}/adapter")
    steady = timer.seconds[2:] or timer.seconds
    print(
        json.dumps(
            {
                "step_seconds": timer.seconds,
                "loop_seconds": loop,
                "seconds_after_imports": time.perf_counter() - started,
                "median_step_seconds": statistics.median(steady),
                "peak_allocated_bytes": peak_allocated,
                "peak_reserved_bytes": peak_reserved,
                # Left to Unsloth, as in its notebooks (unsloth/utils/padding_choice.py: padding-free
                # on an H100); the runner pads (plan.engine.PADDING_FREE), so the table shows both.
                "padding_free": getattr(trainer.args, "padding_free", None),
                "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF"),
            }
        )
    )


if __name__ == "__main__":
    main()
