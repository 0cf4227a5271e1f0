"""Where a stacked CPU training step's time goes: torch.profiler over a few steps of
Roostformer at today's defaults (bf16 copy, 5 folds x 5 seeds of a task stacked),
and the same steps under torch.compile against eager. From the repository root, with
MATBENCH_RAW_DIR set and the task featurized:

    python benchmarks/cpu_profile.py                       # expt_gap, 25 members
    python benchmarks/cpu_profile.py --seeds 1 --compile   # 5 members, and compiled

Prints the profiler's table (ops by their own CPU time) and milliseconds per step.
Share the machine with nothing else, or read only the table's proportions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from mat_bench import training
from mat_bench.data import get_fold_ids, load_featurized
from mat_bench.runs import DEFAULTS, MODEL_KEYS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", default="matbench_expt_gap")
    parser.add_argument("--seeds", type=int, default=5, help="members per fold")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--steps", type=int, default=5, help="steps timed and profiled")
    parser.add_argument("--compile", action="store_true",
                        help="also time the steps with the model under torch.compile")
    args = parser.parse_args()

    df = load_featurized(args.task)
    data = training.TaskData(training.tokenize("roostformer", list(df.composition)),
                             df.target.to_numpy(np.float32), torch.device("cpu"))
    position = pd.Series(np.arange(len(df)), index=df.index)
    members = [training.Member(fold, seed, position.reindex(
        get_fold_ids(args.task, fold)[0]).dropna().to_numpy(np.int64), np.arange(0))
        for fold in range(5) for seed in range(args.seeds)]
    cfg = training.TrainConfig("regression", 1, batch_size=args.batch_size, amp=True,
                               frac_jitter=DEFAULTS["frac_jitter"])
    state = training.new_train_state("roostformer", data, members, cfg,
                                     **{key: DEFAULTS[key] for key in MODEL_KEYS})
    bf16 = state.bf16
    assert bf16 is not None
    plan = data.plan([m.fit_idx for m in members], args.batch_size,
                     [np.random.default_rng(m.seed) for m in members])
    # steps of the commonest length, so eager and compiled see the same shapes
    lengths = [data.step(plan, idx)[0][0].shape[-1] for idx in range(len(plan))]
    common = max(set(lengths), key=lengths.count)
    steps = [idx for idx, n in enumerate(lengths) if n == common]

    def step(idx: int, model: torch.nn.Module) -> None:
        inputs, targets, weight, _ = data.step(plan, idx)
        output = model(*training.jitter_fractions(inputs, cfg.frac_jitter))
        losses = training.member_losses(output, targets, weight, cfg, state.norm_mean,
                                        state.norm_std)
        bf16.backward(losses.sum())
        state.optimizer.step()
        state.scheduler.step()
        bf16.refresh()

    def ms_per_step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        for idx in steps[2:2 + args.steps]:
            step(idx, model)
        return (time.perf_counter() - start) / args.steps * 1e3

    print(f"{args.task}: {len(members)} members, batch {args.batch_size}, "
          f"{common} tokens a material")
    for idx in steps[:2]:
        step(idx, bf16.model)  # warm-up
    print(f"eager: {ms_per_step(bf16.model):.0f} ms/step")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        ms_per_step(bf16.model)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=15))
    if args.compile:
        compiled = torch.compile(bf16.model, dynamic=False)
        start = time.perf_counter()
        step(steps[0], compiled)
        print(f"compiling: {time.perf_counter() - start:.0f} s")
        for _ in range(2):  # interleaved: drift hits both alike
            print(f"eager: {ms_per_step(bf16.model):.0f} ms/step, "
                  f"compiled: {ms_per_step(compiled):.0f} ms/step")


if __name__ == "__main__":
    main()
