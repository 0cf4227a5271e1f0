#!/usr/bin/env bash
# The recipe search (README "Choosing the recipe"): run_folds.py --grid on the
# validation splits of training folds 0 and 1 only (never a test fold), 3 seeds per
# fold stacked with the fold, 100 epochs (a third of the default, for time); each
# table is written to benchmarks/recipe_search/. Resumable: recorded runs are
# skipped. From the repository root, with MATBENCH_RAW_DIR set and the tasks
# featurized:
#   bash benchmarks/recipe_search.sh [OUT_DIR]    # OUT_DIR default: results/search
# It ran with the code of commit 1d3d1e0, whose defaults were no jitter and the mean
# of the members; the flags below pin those, so it reproduces at later defaults.
set -euo pipefail
out="${1:-results/search}"
tables=benchmarks/recipe_search
common=(--model roostformer --run-name A --folds 0 1 --per-task --out-dir "$out"
        --ensemble 3 --epochs 100 --amp --ensemble-aggregation mean --no-val-threshold
        --frac-encoding-dims 64
        --no-prior-threshold)
# the gated output x fraction jitter on expt_gap (gate=true with jitter 0.02 was
# stopped after gate=true alone collapsed on fold 0)
python run_folds.py "${common[@]}" --tasks matbench_expt_gap \
    --grid gate=false,true frac_jitter=0,0.02 --table "$tables/stageA_expt_gap.csv"
# fraction jitter on glass; the classification threshold from the same runs
python run_folds.py "${common[@]}" --tasks matbench_glass \
    --grid frac_jitter=0,0.02 --table "$tables/stageA_glass.csv"
python run_folds.py "${common[@]}" --tasks matbench_expt_is_metal \
    --grid frac_jitter=0.02 --table "$tables/stageA_expt_is_metal.csv"
