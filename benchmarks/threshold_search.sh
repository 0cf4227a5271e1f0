#!/usr/bin/env bash
# Stage C (README "Choosing the recipe"): glass's labels at the training split's
# share of class 1 (71%) against 0.5 and against a threshold chosen on validation
# (cross-fitted), on the validation splits of training folds 0 and 1 only (never a
# test fold), 3 seeds per fold stacked, 100 epochs, at today's recipe: the same runs
# as stage A's glass row with jitter. The table goes to benchmarks/recipe_search/.
# Resumable. From the repository root, with MATBENCH_RAW_DIR set and glass featurized:
#   bash benchmarks/threshold_search.sh [OUT_DIR]    # OUT_DIR default: results/search
set -euo pipefail
out="${1:-results/search}"
python run_folds.py --model roostformer --run-name C --tasks matbench_glass \
    --folds 0 1 --per-task --out-dir "$out" --ensemble 3 --epochs 100 --amp \
    --frac-encoding-dims 64 \
    --ensemble-aggregation mean --no-val-threshold --no-prior-threshold \
    --grid frac_jitter=0.02 \
    --table benchmarks/recipe_search/stageC_glass.csv
