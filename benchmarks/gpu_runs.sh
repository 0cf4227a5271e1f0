#!/usr/bin/env bash
# Final runs on a lent GPU in one call, on a machine with PyTorch and CUDA but
# without this project's other packages or network: installs the wheels in .whl/
# and reads the featurized tasks in .devdata/data (both made by
# benchmarks/prepare_gpu_check.sh), then runs run_folds.py with the given flags and
# --device cuda, writing model_scores/, model_preds/ and job-logs/ under OUT.
# Checkpoints stay on the machine. Each task is recorded as soon as its folds
# finish, so a call cut off by its time limit loses only the task in progress.
#   OUT=/some/folder bash benchmarks/gpu_runs.sh --model roostformer \
#       --run-name roostformer-v2 --per-task --ensemble 5 --tasks matbench_expt_gap
# Back here, merge them into the repository (recorded folds are kept):
#   python benchmarks/merge_results.py FILES_AT
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder for the results}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
start=$(date +%s)
python3 run_folds.py --device cuda --out-dir "$out" "$@" 2>&1 | tee "$out/run_folds.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/run_folds.log"
