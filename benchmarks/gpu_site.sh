#!/usr/bin/env bash
# The packages the lent GPU machine's image lacks (../shared/GPU.md), for Python 3.12 x86_64, packed
# into one tarball that travels with the working tree: ../shared/device/build_site.sh's set (unsloth,
# unsloth_zoo, trl, datasets, bitsandbytes and their small dependencies) plus what this project's own
# code imports and that image does not have (the recipe schema, the console, the tokenizer builder,
# TensorBoard's writer). Usage, in the project root:
#   echo /.gpu/ >> .git/info/exclude; bash benchmarks/gpu_site.sh .gpu/site.tar.gz
# On the GPU machine, benchmarks/gpu_first_command.sh unpacks it and checks every import first.
set -euo pipefail
out=$(realpath -m "${1:-.gpu/site.tar.gz}")
mkdir -p "$(dirname "$out")"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$work/whl" "$@" 2>&1 | grep -v "is ignored" || true
}
# ../shared/device/build_site.sh's list, as last seen.
download unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 bitsandbytes==0.50.2 \
  cut_cross_entropy==25.1.1 torchao==0.18.0 tyro==1.0.17 msgspec==0.22.0 multiprocess==0.70.19 dill==0.4.1 \
  xxhash==4.1.0 docstring-parser typeguard hf_transfer structlog json5 nest-asyncio
# Ours, at requirements.txt's pins: pydantic (recipes), rich (console), PyYAML, psutil, tiktoken +
# llama-models (the tiny model's Llama 3 tokenizer), tensorboard (the run's events; its writer needs
# protobuf, not grpc). Pillow comes with the image's matplotlib.
download pydantic==2.14.3 pydantic_core==2.50.4 annotated-types typing-inspection rich==15.0.0 markdown-it-py \
  mdurl pygments PyYAML==6.0.3 psutil==7.2.2 tiktoken==0.14.0 regex llama_models==0.3.0 tensorboard==2.21.0 \
  tensorboard-data-server==0.7.2 absl-py protobuf markdown werkzeug typing_extensions
mkdir -p "$work/site"; for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
# llama-models also installs its sources as a top-level `models` package, which nothing here imports.
rm -rf "$work/site/studio" "$work/site/unsloth_cli" "$work/site/test" "$work/site/models"
# keep the CPU and CUDA 13 builds of bitsandbytes; the GPU image runs CUDA 13
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda13*.so' \
  ! -name 'libbitsandbytes_cpu.so' -delete
tar -C "$work/site" -czf "$out" .
ls -la "$out"
