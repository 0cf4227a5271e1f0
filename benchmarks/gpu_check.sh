#!/usr/bin/env bash
# The whole GPU check in one call on a machine with a CUDA GPU but without this
# project's packages or network: installs the wheels in .whl/ (made by
# benchmarks/prepare_gpu_check.sh) into a scratch folder, reads featurized data from
# .devdata/, then runs benchmarks/gpu_check.py, which writes JSON under OUT.
#   OUT=/some/folder bash benchmarks/gpu_check.sh [gpu_check.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder for the results}"
scratch=$(mktemp -d)
site="$scratch/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/*.whl || exit 1
# the package is the repository root (pyproject's package-dir), importable as mat_bench
mkdir -p "$scratch/pkg" && ln -sfn "$PWD" "$scratch/pkg/mat_bench"
# stand-in for wandb, which aviary.core imports at module level but which the check
# never uses (runs are --wandb disabled); the real package is 20 MB of the 64 MB that
# may travel
mkdir -p "$scratch/stubs/wandb"
echo '"""Stand-in: the GPU check runs with W&B disabled."""' \
  > "$scratch/stubs/wandb/__init__.py"
export PYTHONPATH="$scratch/pkg:$site:$scratch/stubs"
export MATBENCH_DATA_DIR="$PWD/.devdata/data" PYTHONUNBUFFERED=1
script=benchmarks/gpu_check.py  # --profile: benchmarks/gpu_profile.py instead
if [ "${1:-}" = "--profile" ]; then script=benchmarks/gpu_profile.py; shift; fi
python3 "$script" --out "$out" "$@" 2>&1 | tee "$out/$(basename "$script" .py).log"
