#!/usr/bin/env bash
# Why Wrenformer trails Roostformer on matbench_phonons (README "Choosing the
# recipe", stage B): both models on the validation splits of training folds 0 and 1
# only (never a test fold), 3 seeds per fold stacked with the fold, 100 epochs, at
# the recipe of stage A (2% fraction jitter, the median of the members); Wrenformer
# with aviary's Wyckoff features as they are (raw: counts up to 192 beside element
# features of norm 1) and scaled to [0, 1] (max). Tables go to
# benchmarks/recipe_search/. Resumable: recorded runs are skipped. From the
# repository root, with MATBENCH_RAW_DIR set and matbench_phonons featurized:
#   bash benchmarks/wren_search.sh [OUT_DIR]    # OUT_DIR default: results/search
# It ran with the code of commit 2717aec (1,290 s on the 2-core CPU), whose default
# was raw; the flags below pin the recipe, so it reproduces at later defaults.
set -euo pipefail
out="${1:-results/search}"
tables=benchmarks/recipe_search
common=(--tasks matbench_phonons --folds 0 1 --per-task --out-dir "$out" --ensemble 3
        --epochs 100 --amp --frac-jitter 0.02 --ensemble-aggregation median
        --frac-encoding-dims 64)
python run_folds.py --model roostformer --run-name B-roostformer "${common[@]}" \
    --grid frac_jitter=0.02 --table "$tables/stageB_phonons_roostformer.csv"
python run_folds.py --model wrenformer --run-name B-wrenformer "${common[@]}" \
    --grid wyckoff_features=raw,max --table "$tables/stageB_phonons_wrenformer.csv"
