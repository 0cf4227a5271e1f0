#!/usr/bin/env bash
# Check that a refactor leaves predictions unchanged: train the same tiny model on a
# fixed seed with an earlier commit and with the working tree, then compare their
# test predictions number for number. From the repository root, with
# MATBENCH_RAW_DIR set and the tasks featurized:
#   bash benchmarks/same_predictions.sh OLD_COMMIT [FLAGS for today's code ...]
# FLAGS turn off what OLD_COMMIT did not have, e.g. for f330e2b (before the recipe
# levers): --frac-jitter 0 --ensemble-aggregation mean --wyckoff-features raw
set -euo pipefail
old_commit="$1"; shift
here="$(pwd)"
scratch="$(mktemp -d)"
trap 'git -C "$here" worktree remove --force "$scratch/old" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
git worktree add -q "$scratch/old" "$old_commit"
ln -s "$here/data" "$scratch/old/data"
mkdir "$scratch/pkg" && ln -s "$scratch/old" "$scratch/pkg/mat_bench"  # import it
tiny=(--fold 0 --epochs 3 --d-model 32 --n-heads 2 --n-attn-layers 1 --device cpu
      --no-progress --seed 0)
for pair in roostformer:matbench_steels roostformer:matbench_expt_is_metal \
            wrenformer:matbench_phonons; do
  model="${pair%%:*}" task="${pair#*:}"
  (cd "$scratch/old" && PYTHONPATH="$scratch/pkg" python run_matbench.py \
     --model "$model" --task "$task" "${tiny[@]}" --out-dir "$scratch/a" \
     --run-name a > /dev/null)
  python run_matbench.py --model "$model" --task "$task" "${tiny[@]}" "$@" \
     --out-dir "$scratch/b" --run-name b > /dev/null
done
python - "$scratch" <<'PY'
import sys
import numpy as np
from mat_bench.data import read_run_preds
scratch = sys.argv[1]
old, new = (read_run_preds(f"{scratch}/{d}/model_preds", d) for d in "ab")
for task, folds in old.items():
    for key in ("prediction", "probability"):
        if key in folds["fold_0"]:
            a = np.array(folds["fold_0"][key], float)
            b = np.array(new[task]["fold_0"][key], float)
            same = np.array_equal(a, b)
            print(f"{task} {key}: {'identical' if same else 'DIFFERENT'} ({len(a)})")
            if not same:
                sys.exit(1)
PY
