#!/usr/bin/env bash
# Stage D (README "Choosing the recipe"): the encoder's feed-forward width, torch's
# 2048 (16x d_model) against 512 (4x, the usual transformer ratio), which trains
# Roostformer 2.1x faster on the 2-core CPU (BENCHMARKS.md, v6). On the validation
# splits of training folds 0 and 1 only (never a test fold), at stage A's protocol:
# 3 seeds per fold stacked with the fold, 100 epochs, on expt_gap and glass. The
# table goes to benchmarks/recipe_search/stageD.csv. Resumable: recorded runs are
# skipped. From the repository root, with MATBENCH_RAW_DIR set and the tasks
# featurized:
#   bash benchmarks/ff_search.sh [OUT_DIR]    # OUT_DIR default: results/search
# It ran with the code of commit b692d7f (1,580 s on the 2-core CPU); the flags pin
# the recipe of roostformer-v2, so it reproduces at later defaults.
set -euo pipefail
out="${1:-results/search}"
python run_folds.py --model roostformer --run-name D --folds 0 1 --per-task \
    --out-dir "$out" --ensemble 3 --epochs 100 --amp --frac-jitter 0.02 \
    --frac-encoding-dims 64 \
    --ensemble-aggregation auto --prior-threshold --no-val-threshold \
    --tasks matbench_expt_gap matbench_glass --grid dim_feedforward=2048,512 \
    --table benchmarks/recipe_search/stageD.csv
