#!/usr/bin/env bash
# The commands for a lent GPU machine (../shared/GPU.md), run from the project root with `.gpu` carried
# (benchmarks/gpu_site.sh builds .gpu/site.tar.gz), as two calls of the device tool, each under a hard
# wall-clock budget that includes unpacking, imports and building the model:
#   bash benchmarks/gpu_first_command.sh matrix   # BUDGET=420: the GPU matrix (benchmarks/gpu_truth.py)
#   bash benchmarks/gpu_first_command.sh tests    # BUDGET=300: pytest -m gpu, then the GPU-host tests
# With a machine's start that is about 14 of the 15 minutes a task is lent (lower the tests' BUDGET
# if the start was slow). The matrix comes first: Unsloth compiles each decoder block of a padded
# 4-bit model in its first step (about 100 s by its own estimate, in every process), and the headline
# runs of all three variants need most of its budget.
# Both first check that every package and every module of finetune/ imports (Unsloth first) and record
# the versions there. Small results are written flat in $OUT as they come (the device tool returns at
# most 8 files), so a call cut short still returns what it found: progress.txt (each step, nvidia-smi,
# what was left on the GPU), imports.json, then environment.json, results.jsonl, table.txt,
# run_logs.txt and gpu_truth.log for the matrix, pytest.txt and pytest.xml for the tests. The
# 8B-shaped model, the data and the run folders go under $WORK (/tmp), which does not come back. When the budget ends, what still runs is killed with its process group, and the
# processes left on the GPU are listed (there should be none).
# `make rehearse-gpu` runs this same script on the CPU, as `python3` of a reproduction of the image with
# the network off (benchmarks/rehearse_gpu.sh sets REHEARSE=1: the tiny model, no GPU expected).
set -u
mode=${1:-}
case "$mode" in
  matrix) budget=${BUDGET:-420} ;;
  tests) budget=${BUDGET:-300} ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_first_command.sh matrix|tests"; exit 2 ;;
esac
OUT=${OUT:?set OUT to the folder whose files come back}
WORK=${WORK:-/tmp/gpu-work}
GPU_SITE=${GPU_SITE:-/tmp/gpu-site}
REHEARSE=${REHEARSE:-0}
deadline=$((SECONDS + budget))
mkdir -p "$OUT" "$WORK" "$GPU_SITE"
say() { echo "[+${SECONDS}s] $*" | tee -a "$OUT/progress.txt"; }
left() { echo $((deadline - SECONDS)); }
say "$mode: budget ${budget}s, python3 is $(command -v python3), rehearse=$REHEARSE"

# The packages the image lacks: site/ always, peft-pin/ only when the image's peft is not our pin.
tar -xzf .gpu/site.tar.gz -C "$GPU_SITE" || { say "cannot unpack .gpu/site.tar.gz"; exit 1; }
ours=$(grep -m1 -i '^peft==' requirements.txt | cut -d= -f3)
image_peft=$(python3 -c 'import peft; print(peft.__version__)' 2>/dev/null || echo absent)
export PYTHONPATH=$GPU_SITE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$image_peft" != "$ours" ]; then export PYTHONPATH=$GPU_SITE/peft-pin:$PYTHONPATH; fi
say "peft: the image has $image_peft, our pin is $ours: using $([ "$image_peft" = "$ours" ] && echo the image\'s || echo ours)"
export FINETUNE_LLAMA_CPP=$GPU_SITE/llama.cpp FINETUNE_CACHE=$WORK/cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
# Compiled kernels shared by every process of the call (each run is a process of its own).
export TRITON_CACHE_DIR=$WORK/triton TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
cpu_flag=()
if [ "$REHEARSE" = 1 ]; then export CUDA_VISIBLE_DEVICES=; cpu_flag=(--cpu); fi

# The GPU as the driver sees it, before anything of ours touches it.
{ nvidia-smi || echo "no nvidia-smi"; } >> "$OUT/progress.txt" 2>&1

# The matrix's model (random weights, saved pre-quantized) is built beside the import check.
if [ "$mode" = matrix ]; then
  rehearse=(); [ "$REHEARSE" = 1 ] && rehearse=(--rehearse)
  timeout -k 5 $(($(left) - 30)) python3 benchmarks/gpu_truth.py --out "$WORK/gpu_truth" --build-model \
    "${rehearse[@]}" > "$WORK/build.log" 2>&1 &
  build=$!
fi
timeout -k 5 "$(left)" python3 benchmarks/gpu_check_imports.py --out "$OUT/imports.json" "${cpu_flag[@]}"
status=$?
if [ $status -ne 0 ]; then
  [ "$mode" = matrix ] && kill -- "$build" 2>/dev/null
  say "imports failed (exit $status): see imports.json"; exit 1
fi
say "imports: ok"

gpu_processes() {  # what still holds the GPU: pid, name, memory
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null || true
}

status=0
if [ "$mode" = matrix ]; then
  wait "$build"; built=$?
  tail -3 "$WORK/build.log"
  say "model built (exit $built)"
  [ "$REHEARSE" = 1 ] && rehearse=(--rehearse ${MATRIX_ARGS:-})
  # gpu_truth.py keeps its own deadline (no run starts that cannot finish, a run past it is killed);
  # timeout is the last resort, a few seconds later.
  timeout -k 5 $(($(left) - 5)) python3 benchmarks/gpu_truth.py --out "$WORK/gpu_truth" \
    --results "$OUT" --time-limit $(($(left) - 15)) "${rehearse[@]}" 2>&1 | tee "$OUT/gpu_truth.log"
  status=${PIPESTATUS[0]}
else
  tests=(tests/e2e/test_gpu.py ${EXTRA_TESTS:-tests/e2e/test_gpu_host.py})
  [ "$REHEARSE" = 1 ] && export FINETUNE_GPU_TESTS_ON_CPU=1
  # One test may not take more than half of what is left; the whole run ends before the budget.
  timeout -k 5 $(($(left) - 5)) python3 -m pytest -q -rP -p no:cacheprovider \
    --timeout $(($(left) / 2)) --durations=0 --junitxml="$OUT/pytest.xml" "${tests[@]}" \
    > "$OUT/pytest.txt" 2>&1
  status=$?
  tail -25 "$OUT/pytest.txt"
fi
left_on_gpu=$(gpu_processes)
say "processes left on the GPU: ${left_on_gpu:-none}"
say "$mode: exit $status, $(left)s of the budget left"
exit $status
