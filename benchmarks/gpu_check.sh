#!/usr/bin/env bash
# The whole GPU check in one call on a machine with a CUDA GPU but without this
# project's packages or network: installs the wheels in .whl/ (made by
# benchmarks/prepare_gpu_check.sh) into a scratch folder, reads featurized data from
# .devdata/, then runs benchmarks/gpu_check.py, which writes JSON under OUT.
#   OUT=/some/folder bash benchmarks/gpu_check.sh [gpu_check.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder for the results}"
source benchmarks/gpu_env.sh
script=benchmarks/gpu_check.py  # --profile: benchmarks/gpu_profile.py instead
if [ "${1:-}" = "--profile" ]; then script=benchmarks/gpu_profile.py; shift; fi
python3 "$script" --out "$out" "$@" 2>&1 | tee "$out/$(basename "$script" .py).log"
