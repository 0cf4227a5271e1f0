#!/usr/bin/env bash
# Stage H (README "Choosing the recipe"): three levers for Roostformer on
# matbench_dielectric, the small regression task where today's recipe trails
# CrabNet (0.3482 against 0.3234). One lever at a time against today's defaults
# (rerun here as H-batch_size=128, so the table is self-contained): batch 256 (the
# size CrabNet's rule, 2^round(log2(n) - 4), gives dielectric's ~3,400 training
# materials), aviary's robust L1 with a learned uncertainty (CrabNet's loss), and
# encoder dropout 0.1 (and two follow-ups added after those ran: robust L1 at half
# the learning rate, and a log target). Stage A's protocol on the validation splits
# of training folds 0 and 1 only (never a test fold): 3 seeds per fold stacked with
# the fold, 100 epochs. The rule, fixed before the runs: a lever is proposed where
# it lowers the validation MAE by more than 2% (stage F's margin; of several, the
# best), and adopted only once its full 5-fold runs confirm that on their own
# validation splits, as stage F's step two. Table:
# benchmarks/recipe_search/stageH_dielectric.csv.
# Resumable: recorded runs are skipped. From the repository root, with
# MATBENCH_RAW_DIR set and dielectric featurized:
#   bash benchmarks/dielectric_search.sh [OUT_DIR]    # OUT_DIR default: results/search
set -euo pipefail
out="${1:-results/search}"
common=(--model roostformer --run-name H --folds 0 1 --per-task --out-dir "$out"
        --ensemble 3 --epochs 100 --amp --frac-jitter 0.02
        --ensemble-aggregation auto --tasks matbench_dielectric)
python run_folds.py "${common[@]}" --grid batch_size=128,256
# robust L1 at today's learning rate: 5 of its 6 members collapsed (each predicting
# one value), so its fold 0 is not recorded and run_folds.py fails; the table keeps
# what was recorded, and a run recorded on fewer folds or members than the
# protocol's is not eligible under the rule
python run_folds.py "${common[@]}" --grid robust=true || true
python run_folds.py "${common[@]}" --grid dropout=0.1
# a follow-up added after that collapse (the same rule): robust L1 at half the
# learning rate
python run_folds.py "${common[@]}" --run-name H-robust --robust \
    --grid learning_rate=5e-4
# a second follow-up, added with the --log-target flag after the runs above (the
# same rule): the model fits log(n), whose bulk the tail (n up to 62) squeezes less
python run_folds.py "${common[@]}" --grid log_target=true
OUT_DIR="$out" python - <<'PY'
import os
from pathlib import Path

from mat_bench.run_folds import validation_table

runs = ["H-batch_size=128", "H-batch_size=256", "H-robust=true", "H-dropout=0.1",
        "H-robust-learning_rate=5e-4", "H-log_target=true"]
table = validation_table(Path(os.environ["OUT_DIR"]), runs)
print(table.to_string(index=False))
table.to_csv("benchmarks/recipe_search/stageH_dielectric.csv", index=False,
             float_format="%.5g")
PY
