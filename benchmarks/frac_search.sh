#!/usr/bin/env bash
# Stage F (README "Choosing the recipe"): the sinusoidal fraction encoding per task,
# on (64 dims, the default) or off (0; the fraction stays one raw input feature),
# Roostformer. Stage A's protocol on the validation splits of training folds 0 and 1
# only (never a test fold): 3 seeds per fold stacked with the fold, 100 epochs, at
# roostformer-v2's recipe otherwise. expt_gap's and glass's 64-dim runs are stage D's
# 2048 row (the same runs, which reproduce to the last digit), so they are not rerun.
# The table goes to benchmarks/recipe_search/stageF.csv; runs.TASK_DEFAULTS holds
# what it chose (the rule: README). Then the same question for Wrenformer on
# phonons, the one structure task here (its own run names, table
# stageF_wrenformer.csv). Resumable: recorded runs are skipped. From the
# repository root, with MATBENCH_RAW_DIR set and the tasks featurized:
#   bash benchmarks/frac_search.sh [OUT_DIR]    # OUT_DIR default: results/search
set -euo pipefail
out="${1:-results/search}"
protocol=(--folds 0 1 --per-task --out-dir "$out" --ensemble 3 --epochs 100 --amp
          --frac-jitter 0.02 --ensemble-aggregation auto --prior-threshold
          --no-val-threshold)
common=(--model roostformer --run-name F "${protocol[@]}")
python run_folds.py "${common[@]}" --grid frac_encoding_dims=0 \
    --tasks matbench_glass matbench_expt_gap
python run_folds.py "${common[@]}" --grid frac_encoding_dims=0,64 \
    --tasks matbench_steels matbench_jdft2d matbench_phonons matbench_expt_is_metal \
    matbench_dielectric --table benchmarks/recipe_search/stageF.csv
python run_folds.py --model wrenformer --run-name F-wrenformer "${protocol[@]}" \
    --grid frac_encoding_dims=0,64 --tasks matbench_phonons \
    --table benchmarks/recipe_search/stageF_wrenformer.csv
