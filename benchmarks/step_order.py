"""What the shared step order saves: stacked members trained on one plan whose steps
give every member its batch of the same length rank (today's `TaskData.plan`)
against the same plan with each member's batches in its own random order (the
order before, where a step is as wide as its widest member's batch). One model,
one process, the two orders alternating epoch by epoch, so the machine's drift hits
both alike; prints each epoch's seconds, the padded tokens per real token (a
Wrenformer material counts once per equivalent Wyckoff sequence, each as long as
its longest) and the median ratio of the pairs as JSON.

Examples:
    python benchmarks/step_order.py --task matbench_dielectric --ensemble 5 --amp
    python benchmarks/step_order.py --task matbench_expt_gap --batch-size 32 --amp
    python benchmarks/step_order.py --model wrenformer --task matbench_phonons --amp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark_training import MODEL, training_frame  # noqa: E402


def independent_order(data, plan, rng: np.random.Generator):
    """The plan with each member's steps shuffled on their own, as before."""
    mat = plan.mat.cpu().numpy().copy()
    for m in range(mat.shape[1]):
        mat[:, m] = mat[rng.permutation(len(plan)), m]
    return data.plan_from(mat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roostformer",
                        choices=["roostformer", "wrenformer"])
    parser.add_argument("--task", default="matbench_dielectric")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=4, help="epochs of each order")
    parser.add_argument("--amp", action="store_true", help="the bf16 copy on a CPU")
    args = parser.parse_args(argv)

    import pandas as pd
    import torch

    from mat_bench import training

    frames = [training_frame(args.task, args.model, None, fold=fold)
              for fold in args.folds]
    both = pd.concat(frames)
    data = training.TaskData(training.tokenize(args.model, list(both.inputs)),
                             both.target.to_numpy(np.float32), torch.device("cpu"))
    bounds = np.cumsum([0] + [len(df) for df in frames])
    members = [training.Member(f, s, np.arange(bounds[f], bounds[f + 1]), np.arange(0))
               for f in range(len(frames)) for s in range(args.ensemble)]
    cfg = training.TrainConfig("regression", 2 * args.pairs + 1,
                               batch_size=args.batch_size, amp=args.amp)
    state = training.new_train_state(args.model, data, members, cfg, **MODEL)
    make_plan, rng = data.plan, np.random.default_rng(0)
    # tokens: Wrenformer encodes each material once per equivalent Wyckoff sequence
    real = sum(int((data.length[m.fit_idx] * data.n_seq[m.fit_idx]).sum())
               for m in members)
    rows: list[dict] = []

    def timed_epoch(order: str) -> None:
        plans = []

        def plan(*plan_args):
            made = make_plan(*plan_args)
            if order == "independent":
                made = independent_order(data, made, rng)
            plans.append(made)
            return made

        data.plan = plan
        cfg.epochs = state.epoch + 1
        start = time.perf_counter()
        training.train(state, data, cfg, progress=False)
        seconds = time.perf_counter() - start
        rows_per_step = ([args.batch_size] * len(plans[0])
                         if plans[0].seq_bounds is None
                         else np.diff(plans[0].seq_bounds))  # sequences, padded
        tokens = len(members) * sum(n * width for n, width in zip(
            rows_per_step, plans[0].width, strict=True))
        rows.append({"order": order, "seconds": round(seconds, 3),
                     "padded_tokens_per_real": round(tokens / real, 3)})
        print(json.dumps(rows[-1]), flush=True)

    timed_epoch("shared")  # warm-up
    rows.clear()
    for pair in range(args.pairs):
        for order in (("shared", "independent") if pair % 2 == 0
                      else ("independent", "shared")):
            timed_epoch(order)
    ratios = [ind["seconds"] / sh["seconds"] for sh, ind in zip(
        [r for r in rows if r["order"] == "shared"],
        [r for r in rows if r["order"] == "independent"], strict=True)]
    print(json.dumps({"model": args.model, "task": args.task,
                      "members": len(members),
                      "batch_size": args.batch_size, "amp": args.amp,
                      "independent_over_shared_seconds": round(float(np.median(ratios)),
                                                               3),
                      "ratios": [round(r, 3) for r in ratios], "epochs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
