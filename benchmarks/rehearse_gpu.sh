#!/usr/bin/env bash
# The GPU command (benchmarks/gpu_first_command.sh) rehearsed on the CPU, as the GPU machine will run it:
# - `python3` of a reproduction of the GPU image (.venv-gpu-image: Python 3.12 with exactly the packages
#   of benchmarks/gpu_image.txt, torch 2.11 among them, and nothing of requirements.txt; built once,
#   rebuilt when that file changes), with no `python` on PATH;
# - in a copy of what the device tool sends (tracked and untracked files git does not ignore, plus .gpu
#   with the site tarball benchmarks/gpu_site.sh builds, rebuilt when it or requirements.txt changes):
#   nothing of .venv, runs/ or any other ignored path is there;
# - with the network off (a network namespace of its own, loopback only) and a bare environment;
# - the same script, with REHEARSE=1: the tiny model, no GPU expected, MATRIX_ARGS for gpu_truth.py.
# Usage (make rehearse-gpu runs both):
#   bash benchmarks/rehearse_gpu.sh matrix|tests OUT
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?matrix or tests}
out=$(realpath -m "${2:?OUT: the folder for what would come back}")
root=$PWD
image=$root/.venv-gpu-image

python312() {  # a Python 3.12, wherever this machine keeps one
  local candidate
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "rehearse_gpu.sh: no Python 3.12 here (the GPU image's Python)" >&2; exit 1
}

stamp=$image/.from-$(sha256sum benchmarks/gpu_image.txt | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "building $image (the GPU image's packages, once)"
  rm -rf "$image"
  "$(python312)" -m venv "$image"
  "$image/bin/python3" -m pip install --quiet --disable-pip-version-check -r benchmarks/gpu_image.txt
  rm -f "$image/bin/python"  # the image may have no `python`: a call of it must fail here too
  touch "$stamp"
fi

site_stamp=.gpu/.from-$(cat benchmarks/gpu_site.sh requirements.txt | sha256sum | cut -c1-16)
if [ ! -f "$site_stamp" ] || [ ! -f .gpu/site.tar.gz ]; then
  rm -f .gpu/.from-*
  bash benchmarks/gpu_site.sh .gpu/site.tar.gz
  touch "$site_stamp"
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
tree=$scratch/tree
mkdir -p "$tree" "$scratch/home" "$out"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' file; do [ -e "$file" ] && [ ! -d "$file" ] && printf '%s\0' "$file"; done \
  | xargs -0 cp --parents -t "$tree"
cp -r .gpu "$tree/.gpu"

# A namespace with no network but loopback (torchrun's rendezvous needs it, as on the GPU machine).
unshare --net sh -c 'ip link set lo up && exec "$@"' rehearse \
  env -i PATH="$image/bin:/usr/local/bin:/usr/bin:/bin" HOME="$scratch/home" LANG=C.UTF-8 \
  OUT="$out" WORK="$scratch/work" GPU_SITE="$scratch/site" REHEARSE=1 \
  ${BUDGET:+BUDGET="$BUDGET"} ${MATRIX_ARGS:+MATRIX_ARGS="$MATRIX_ARGS"} \
  ${EXTRA_TESTS+EXTRA_TESTS="$EXTRA_TESTS"} \
  bash -c 'cd "$0" && exec bash benchmarks/gpu_first_command.sh "$1"' "$tree" "$mode"
