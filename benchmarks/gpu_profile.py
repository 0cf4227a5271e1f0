"""Where the GPU step's time goes, and whether the graphed step matches the eager one
on identical shapes (benchmarks/gpu_check.sh sets up the machine; run this with
`OUT=... bash benchmarks/gpu_check.sh --profile`):

1. same shapes: eager steps at the graph's fixed width vs graphed steps, fp32, two
   members on expt_gap: each step's training loss side by side over one epoch.
2. kernels: torch.profiler over 5 eager bf16 steps of 5 stacked members at batch
   256 on mp_e_form (the kernels a graph replays): the top kernels by GPU time.
3. padding: graphed epochs of those 5 members at the task's longest material (9
   tokens) against the same materials cut to those of at most 4 elements, so the
   cost of padding to one width is measured.
4. attention: graphed epochs of those members with each choice of attention
   kernels (torch's own, memory-efficient, math).

Writes OUT/gpu_profile.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mat_bench import training
from mat_bench.data import get_fold_ids, load_featurized

CUDA = torch.device("cuda")
MODEL = {"frac_encoding_dims": 64, "d_model": 128, "n_attn_layers": 3,
         "n_attn_heads": 4}


def task_data(
    task: str, max_elements: int | None = None
) -> tuple[training.TaskData, list[training.Member], np.ndarray, np.ndarray]:
    """A task's rows (optionally only materials of at most max_elements elements),
    one member per fold (seed 0, no validation split) and fold 0's test rows."""
    df = load_featurized(task)
    tokens = training.tokenize("roostformer", list(df.composition))
    keep = np.ones(len(df), bool) if max_elements is None else (
        tokens.length <= max_elements)
    df = df[keep]
    data = training.TaskData(tokens.subset(np.flatnonzero(keep)),
                             df.target.to_numpy(np.float32), CUDA)
    position = pd.Series(np.arange(len(df)), index=df.index)
    members = []
    for fold in range(5):
        train_ids, test_ids = get_fold_ids(task, fold)
        rows = position.reindex(train_ids).dropna().to_numpy(np.int64)
        members.append(training.Member(fold, 0, rows, np.arange(0)))
        if fold == 0:
            test = position.reindex(test_ids).dropna().to_numpy(np.int64)
    return data, members, test, df.target.to_numpy()


def same_shapes() -> dict[str, Any]:
    """Per-step training losses of the first epoch, eager at the graph's fixed
    width vs graphed (3 eager warm-up steps, the capture, then replays), fp32."""
    data, members, _, _ = task_data("matbench_expt_gap")
    members = [training.Member(0, seed, members[0].fit_idx, np.arange(0))
               for seed in (0, 1)]
    losses = {}
    for graphs in (False, True):
        cfg = training.TrainConfig("regression", 1, batch_size=64, cuda_graphs=graphs)
        state = training.new_train_state("roostformer", data, members, cfg, **MODEL)
        plan = data.plan([m.fit_idx for m in members], 64,
                         [np.random.default_rng(m.seed) for m in members])
        steps = []
        if graphs:
            graph = training.GraphedStep(state, data, cfg, len(plan))

            # the step's losses alone
            def read_and_reset(graph=graph, steps=steps) -> None:
                steps.append(graph.loss_sum.tolist())
                graph.loss_sum.zero_()

            graph.run_epoch(plan, on_step=read_and_reset)
        else:
            for step in range(len(plan)):
                _, targets, weight, mat = data.step(plan, step)
                output = state.model(*data.inputs(mat, data.max_len))
                loss = training.member_losses(output, targets, weight, cfg,
                                              state.norm_mean, state.norm_std)
                state.optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                state.optimizer.step()
                state.scheduler.step()
                steps.append(loss.tolist())
        losses[graphs] = np.array(steps)
    rel = np.abs(losses[True] - losses[False]) / np.abs(losses[False])
    return {"steps": len(rel), "max_rel_diff_first_10": float(rel[:10].max()),
            "max_rel_diff_first_30": float(rel[:30].max()),
            "max_rel_diff_all": float(rel.max()),
            "rel_diff_by_step": rel.max(axis=1).round(8).tolist()}


def kernels() -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    data, members, _, _ = task_data("matbench_mp_e_form")
    cfg = training.TrainConfig("regression", 1, batch_size=256, amp=True)
    state = training.new_train_state("roostformer", data, members, cfg, **MODEL)
    plan = data.plan([m.fit_idx for m in members], 256,
                     [np.random.default_rng(0)] * 5)

    def step(idx: int) -> None:
        inputs, targets, weight, _ = data.step(plan, idx)
        with training.autocast(CUDA, True):
            output = state.model(*inputs)
        losses = training.member_losses(output, targets, weight, cfg, state.norm_mean,
                                        state.norm_std)
        state.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        state.optimizer.step()

    for idx in range(5):
        step(idx)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for idx in range(5, 10):
            step(idx)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        cuda_us = (getattr(evt, "device_time_total", 0)
                   or getattr(evt, "cuda_time_total", 0))
        if cuda_us:
            rows.append({"name": evt.key[:90], "count": evt.count,
                         "cuda_ms_per_step": round(cuda_us / 5 / 1000, 4)})
    rows.sort(key=lambda row: -row["cuda_ms_per_step"])
    total = sum(row["cuda_ms_per_step"] for row in rows)
    return {"gpu_ms_per_step": round(total, 3), "top": rows[:30],
            "widths": sorted(set(plan.width))}


def graphed_epochs(data: training.TaskData, members: list[training.Member],
                   epochs: int) -> dict[str, Any]:
    """Train members with CUDA graphs at batch 256 in bf16; each epoch's seconds
    and the samples/s of the last (the first holds the warm-up and capture)."""
    cfg = training.TrainConfig("regression", epochs, batch_size=256, amp=True,
                               cuda_graphs=True)
    state = training.new_train_state("roostformer", data, members, cfg, **MODEL)
    stamps = [time.perf_counter()]
    training.train(state, data, cfg, progress=False,
                   on_epoch_end=lambda *_: stamps.append(time.perf_counter()))
    seconds = np.diff(stamps)
    n = sum(len(m.fit_idx) for m in members)
    del state
    torch.cuda.empty_cache()
    return {"materials_per_epoch": n, "epoch_seconds": seconds.tolist(),
            "samples_per_s": round(n / float(seconds[-1]), 1),
            "steps_per_epoch": training.steps_per_epoch(members, 256)}


def padding() -> dict[str, Any]:
    out = {}
    for max_elements in (None, 4):
        data, members, _, _ = task_data("matbench_mp_e_form", max_elements)
        out[f"width_{data.max_len}"] = graphed_epochs(data, members, 3)
    return out


def attention() -> dict[str, Any]:
    """Graphed epochs of 5 stacked members at 256 on mp_e_form with each choice of
    attention kernels (sequences of at most 9 tokens)."""
    from torch.nn.attention import SDPBackend

    data, members, _, _ = task_data("matbench_mp_e_form")
    out = {}
    default = training.CUDA_SDPA_BACKENDS
    for name, backends in (("default", None),
                           ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("math", [SDPBackend.MATH])):
        training.CUDA_SDPA_BACKENDS = backends
        out[name] = graphed_epochs(data, members, 2)
    training.CUDA_SDPA_BACKENDS = default
    return out


def main() -> int:
    out_dir = Path(sys.argv[sys.argv.index("--out") + 1])
    parts = {"same_shapes": same_shapes, "kernels": kernels, "padding": padding,
             "attention": attention}
    if "--parts" in sys.argv:
        parts = {name: parts[name] for name in sys.argv[sys.argv.index("--parts") + 1:]}
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name()}
    for name, func in parts.items():
        start = time.perf_counter()
        try:
            report[name] = func()
        except Exception as exc:  # keep the other parts
            import traceback

            report[name] = {"error": traceback.format_exc()[-2000:]}
            print(exc, flush=True)
        report[name + "_seconds"] = round(time.perf_counter() - start, 1)
        (out_dir / "gpu_profile.json").write_text(json.dumps(report, indent=1))
        print(name, json.dumps(report[name])[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
