#!/usr/bin/env bash
# Stage E of the recipe search (benchmarks/wren_curves.sh: both models' learning
# curves on all 5 matbench_phonons folds, then Wrenformer's candidates) on a lent
# GPU in one call, on a machine with PyTorch and CUDA but without this project's
# other packages or network (.whl/ and .devdata/ from
# benchmarks/prepare_gpu_check.sh). Checkpoints stay on the machine; the runs'
# scores and predictions come back under OUT/search, and the script's log as
# OUT/gpu_search.log. Runs it finished are skipped if it is called again on the same
# machine.
#   OUT=/some/folder bash benchmarks/gpu_search.sh
# Back here, the tables come from the returned scores (validation only), copied
# out of the read-only FILES_AT first:
#   cp -r FILES_AT/search results/gpu_search
#   python run_folds.py --model wrenformer --run-name E-wrenformer \
#       --tasks matbench_phonons --per-task --out-dir results/gpu_search \
#       --grid dropout=0.2 --table T.csv --curves C.csv
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder for the results}"
source benchmarks/gpu_env.sh
work=results/gpu_search_runs  # git-ignored; checkpoints (about 200 MB a run) stay here
start=$(date +%s)
bash benchmarks/wren_curves.sh "$work" --device cuda 2>&1 | tee "$out/gpu_search.log"
mkdir -p "$out/search"
cp -r "$work/model_scores" "$work/model_preds" "$out/search/" 2>/dev/null
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/gpu_search.log"
