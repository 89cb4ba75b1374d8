#!/usr/bin/env bash
# The one command for a lent GPU machine (../shared/GPU.md), run from the project root with `.gpu`
# carried: unpack the packages its image lacks (benchmarks/gpu_site.sh built them), check that every
# module this project imports loads and that torch sees the GPU, then run the GPU matrix
# (benchmarks/gpu_truth.py) into $OUT, and with the time left the GPU tests. Everything it learns is
# written under $OUT as it goes, so a command cut short still returns what it found.
#   LIMIT=420 bash benchmarks/gpu_first_command.sh      (LIMIT: seconds for the matrix)
set -u
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p /tmp/site "$OUT" && tar -xzf .gpu/site.tar.gz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python - > "$OUT/imports.txt" 2>&1 <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "unsloth_zoo",
             "unsloth", "pydantic", "rich", "yaml", "psutil", "tiktoken", "llama_models", "tensorboard",
             "PIL", "matplotlib", "safetensors", "finetune.cli"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", ""))
    except Exception as error:  # report every failure, not just the first
        missing.append(name)
        print(name, "FAILED:", type(error).__name__, str(error)[:300])
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
EOF
status=$?
cat "$OUT/imports.txt"
if [ $status -ne 0 ]; then echo "imports failed: see imports.txt"; exit 1; fi
python benchmarks/gpu_truth.py --out "$OUT/gpu_truth" --time-limit "${LIMIT:-420}" 2>&1 | tee "$OUT/gpu_truth.log"
rm -rf "$OUT/gpu_truth"/llama-3.1-8b-shaped* "$OUT/gpu_truth/runs" "$OUT"/gpu_truth/data-*.jsonl  # too large to return
timeout 120 python -m pytest -q -m gpu tests/e2e/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
tail -5 "$OUT/pytest_gpu.txt"
