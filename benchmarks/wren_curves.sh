#!/usr/bin/env bash
# Where Wrenformer loses to Roostformer on matbench_phonons (README "Choosing the
# recipe", stage E): both models at today's defaults on all 5 training folds, one
# member per fold, 300 epochs, each member's validation score recorded every 10
# epochs (the learning curves) and never a test fold's. Stage B searched folds 0 and
# 1 only, where Wrenformer leads; the committed runs trail on folds 2 and 4. Tables
# go to benchmarks/recipe_search/stageE_*. Resumable: recorded runs are skipped and
# checkpoints resume. From the repository root, with MATBENCH_RAW_DIR set and
# matbench_phonons featurized:
#   bash benchmarks/wren_curves.sh [OUT_DIR] [FLAGS ...]  # OUT_DIR: results/search
# FLAGS go to every run, e.g. --device cuda on a GPU (where --amp is bf16 autocast,
# CUDA's default anyway). After the two baselines come the candidates for
# Wrenformer, each one run of the same protocol with a setting or two changed, named
# after it as run_folds.py --grid names it.
set -euo pipefail
out="${1:-results/search}"; shift || true
tables=benchmarks/recipe_search
common=(--tasks matbench_phonons --per-task --out-dir "$out" --checkpoint local --amp
        --frac-encoding-dims 64
        "$@")
python run_folds.py --model roostformer --run-name E-roostformer "${common[@]}"
python run_folds.py --model wrenformer --run-name E-wrenformer "${common[@]}"
python run_folds.py --model roostformer --run-name E-roostformer "${common[@]}" \
    --table "$tables/stageE_phonons_roostformer.csv" \
    --curves "$tables/stageE_phonons_roostformer_curves.csv"
python run_folds.py --model wrenformer --run-name E-wrenformer "${common[@]}" \
    --table "$tables/stageE_phonons_wrenformer.csv" \
    --curves "$tables/stageE_phonons_wrenformer_curves.csv"
# candidates: dropout in the encoder (Wrenformer stops gaining after epoch 200)
python run_folds.py --model wrenformer --run-name E-wrenformer "${common[@]}" \
    --grid dropout=0.1 --table "$tables/stageE_phonons_wrenformer_dropout.csv" \
    --curves "$tables/stageE_phonons_wrenformer_dropout_curves.csv"
# dropout 0.1 gained 4.5% (README, stage E); next: more of it, and it with weight decay
python run_folds.py --model wrenformer --run-name E-wrenformer "${common[@]}" \
    --grid dropout=0.2 --table "$tables/stageE_phonons_wrenformer_dropout0.2.csv" \
    --curves "$tables/stageE_phonons_wrenformer_dropout0.2_curves.csv"
python run_folds.py --model wrenformer --run-name E-wrenformer "${common[@]}" \
    --grid dropout=0.1 weight_decay=0.1 \
    --table "$tables/stageE_phonons_wrenformer_dropout_wd.csv" \
    --curves "$tables/stageE_phonons_wrenformer_dropout_wd_curves.csv"
