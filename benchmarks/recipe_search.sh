#!/usr/bin/env bash
# The recipe search (README "Choosing the recipe"): run_folds.py --grid on the
# validation splits of training folds only (never a test fold), each table written
# to benchmarks/recipe_search/. Resumable: recorded runs are skipped. Usage, from the
# repository root, with MATBENCH_RAW_DIR set and the tasks featurized:
#   bash benchmarks/recipe_search.sh [OUT_DIR]    # OUT_DIR default: results/search
set -euo pipefail
out="${1:-results/search}"
tables=benchmarks/recipe_search
common=(--model roostformer --run-name A --folds 0 1 --per-task --out-dir "$out"
        --ensemble 3 --epochs 100 --amp)
# stage A: 2 folds x 3 seeds, 100 epochs each (a third of the default epochs)
python run_folds.py "${common[@]}" --tasks matbench_expt_gap \
    --grid gate=false,true frac_jitter=0,0.02 --table "$tables/stageA_expt_gap.csv"
python run_folds.py "${common[@]}" --tasks matbench_glass matbench_expt_is_metal \
    --grid frac_jitter=0,0.02 --table "$tables/stageA_classification.csv"
