r"""Training throughput: aviary's own loop against this project's trainer, on the same
data, model, batch size, optimizer (AdamW) and learning rate.

Examples:
    python benchmark_training.py                          # 3 cases, batch 32,
                                                          # this machine
    python benchmark_training.py --amp --max-train 4000   # bf16 on a CPU too
    python benchmark_training.py --device cuda --batch-sizes 32 1024
    python benchmark_training.py --cases roostformer-expt_gap --max-train 500 --epochs 2
    python benchmark_training.py --labels                 # Wyckoff labels/s on phonons
    python benchmark_training.py --cases roostformer-expt_gap --folds 0 1 2 3 4 \
        --amp                                             # 5 folds stacked vs aviary x5
    python benchmark_training.py --impls ours --cases roostformer-expt_gap \
        --folds 0 1 2 3 4 --ensemble 5 --amp --dim-feedforward 512  # a narrower encoder
    python benchmark_training.py --device cuda --impls ours --cuda-graphs \
        --cases roostformer-mp_e_form --folds 0 1 2 3 4 --ensemble 4 --batch-sizes 256

For each case (task, model) and batch size it measures, for (a) aviary's reference
loop (`df_to_in_mem_dataloader` + `Wrenformer.evaluate(action="train")`) and (b)
`training.train`: training samples/s over the epochs after a warm-up epoch, the time
to the first batch (featurization plus tensorization) and peak memory (RSS; CUDA peak
on a GPU). Each measurement runs in its own subprocess, so peak memory is its own,
and is repeated (--repeats, interleaved aviary/ours) since a shared machine's speed
drifts: the table shows medians, and the speed-up is the median of side-by-side ratios.
Data: the training ids of Matbench fold 0, featurized by featurize_matbench.py,
optionally cut to --max-train rows. It is a benchmark, not a test: record its table
in BENCHMARKS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mat_bench.data import ArgumentParser
from mat_bench.runs import DEFAULTS, TORCH_FEEDFORWARD

# defaults in one place: the model of runs.DEFAULTS, aviary's raw features
CASES = {
    "roostformer-expt_gap": ("roostformer", "matbench_expt_gap"),
    "roostformer-mp_e_form": ("roostformer", "matbench_mp_e_form"),
    "roostformer-dielectric": ("roostformer", "matbench_dielectric"),  # 1-6 elements
    "wrenformer-phonons": ("wrenformer", "matbench_phonons"),
}
DEFAULT_CASES = ("roostformer-expt_gap", "roostformer-mp_e_form", "wrenformer-phonons")
MODEL = {"d_model": DEFAULTS["d_model"], "n_attn_layers": DEFAULTS["n_attn_layers"],
         "n_attn_heads": DEFAULTS["n_attn_heads"]}
LEARNING_RATE = DEFAULTS["learning_rate"]  # (the speed does not depend on it)
EPOCHS = 3  # the first is the warm-up
BATCH_SIZES = (32,)
IMPLS = ("aviary", "ours")
REPEATS = 3  # interleaved runs per implementation (this VM's speed drifts)


def training_frame(task: str, model: str, max_train: int | None, seed: int = 0,
                   fold: int = 0):
    """A fold's training rows of a featurized task (input column, target), cut to
    max_train rows at random."""
    from mat_bench.data import get_fold_ids, load_featurized

    df = load_featurized(task).loc[get_fold_ids(task, fold)[0]]
    col = "protostructure" if model == "wrenformer" else "composition"
    df = df[df[col].notna()]
    if max_train and len(df) > max_train:
        df = df.sample(max_train, random_state=seed)
    return df.rename(columns={col: "inputs"})[["inputs", "target"]]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_aviary(df, model: str, batch_size: int, device: str, epochs: int
                   ) -> dict[str, Any]:
    """aviary's reference loop: in-memory loader, per-batch collation, evaluate()."""
    import torch
    from aviary.data import Normalizer
    from aviary.wrenformer.data import df_to_in_mem_dataloader
    from aviary.wrenformer.model import Wrenformer

    start = time.perf_counter()
    loader = df_to_in_mem_dataloader(
        df, input_col="inputs", target_col="target", id_col=None, device=device,
        embedding_type="protostructure" if model == "wrenformer" else "composition",
        batch_size=batch_size, shuffle=True)
    first = next(iter(loader))
    sync(device)
    first_batch_s = time.perf_counter() - start
    net = Wrenformer(n_targets=[1], n_features=first[0][0].shape[-1],
                     task_dict={"target": "regression"}, robust=False, device=device,
                     **MODEL).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    normalizer = Normalizer()
    normalizer.fit(torch.tensor(df.target.to_numpy(), dtype=torch.float32))
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        net.evaluate(loader, {"target": ("regression", torch.nn.L1Loss())}, optimizer,
                     {"target": normalizer}, action="train")
        sync(device)
        epoch_seconds.append(time.perf_counter() - start)
    return {"first_batch_s": first_batch_s, "epoch_seconds": epoch_seconds}


def measure_ours(frames: Sequence, model: str, batch_size: int, device: str,
                 epochs: int, amp: bool | None = None, ensemble: int = 1,
                 cuda_graphs: bool = False,
                 dim_feedforward: int = TORCH_FEEDFORWARD) -> dict[str, Any]:
    """This project's trainer on all frames at once: one member per (frame, seed),
    stacked into one model (tokens on the device, length buckets, fused AdamW)."""
    import aviary.wren.data  # noqa: F401  imported before the clock starts, as
    import pandas as pd
    import pymatgen.core  # noqa: F401  measure_aviary imports aviary's loader
    import torch

    from mat_bench.training import (
        Member,
        TaskData,
        TrainConfig,
        new_train_state,
        tokenize,
        train,
    )

    dev = torch.device(device)
    start = time.perf_counter()
    both = pd.concat(frames)
    data = TaskData(tokenize(model, list(both.inputs)),
                    both.target.to_numpy(np.float32), dev)
    bounds = np.cumsum([0] + [len(df) for df in frames])
    members = [Member(fold, seed, np.arange(bounds[fold], bounds[fold + 1]),
                      np.arange(0))
               for fold in range(len(frames)) for seed in range(ensemble)]
    cfg = TrainConfig("regression", epochs, batch_size=batch_size,
                      learning_rate=LEARNING_RATE, cuda_graphs=cuda_graphs,
                      amp=dev.type == "cuda" if amp is None else amp)
    plan = data.plan([m.fit_idx for m in members], batch_size,
                     [np.random.default_rng(0)] * len(members))
    data.step(plan, 0)
    sync(device)
    first_batch_s = time.perf_counter() - start
    state = new_train_state(model, data, members, cfg, **MODEL,
                            dim_feedforward=dim_feedforward)
    epoch_seconds: list[float] = []
    stamp = [time.perf_counter()]

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> bool:
        now = time.perf_counter()  # train() synchronizes once per epoch (the loss)
        epoch_seconds.append(now - stamp[0])
        stamp[0] = now
        return False

    train(state, data, cfg, on_epoch_end=on_epoch_end, progress=False)
    return {"first_batch_s": first_batch_s, "epoch_seconds": epoch_seconds,
            "precision": "bf16" if cfg.amp else "fp32"}


def measure(impl: str, case: str, batch_size: int, device: str, epochs: int,
            max_train: int | None, amp: bool | None = None, folds: Sequence[int] = (0,),
            ensemble: int = 1, cuda_graphs: bool = False,
            dim_feedforward: int = TORCH_FEEDFORWARD) -> dict[str, Any]:
    """One measurement in this process; returns the row of the results table.
    aviary trains one model per fold (and ensemble member) after another; ours
    trains them all at once, stacked."""
    import torch

    model, task = CASES[case]
    frames = [training_frame(task, model, max_train, fold=fold) for fold in folds]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    n_samples = sum(map(len, frames)) * ensemble  # per epoch, over all models
    if impl == "aviary":
        outs = [measure_aviary(df, model, batch_size, device, epochs) for df in frames]
        timed = [sum(epochs) for epochs in zip(*[out["epoch_seconds"][1:]
                                                 or out["epoch_seconds"]
                                                 for out in outs], strict=True)]
        n_samples = sum(map(len, frames))  # ensemble members would take E times as long
        out = {"first_batch_s": sum(o["first_batch_s"] for o in outs)}
        label = "aviary"
    else:
        out = measure_ours(frames, model, batch_size, device, epochs, amp=amp,
                           ensemble=ensemble, cuda_graphs=cuda_graphs,
                           dim_feedforward=dim_feedforward)
        timed = out["epoch_seconds"][1:] or out["epoch_seconds"]
        label = f"ours ({out['precision']}{', graphs' if cuda_graphs else ''})"
    row = {
        "case": case, "impl": label, "batch_size": batch_size, "device": device,
        "folds": len(folds), "ensemble": ensemble, "dim_feedforward": dim_feedforward,
        "n_train": sum(map(len, frames)), "epochs_timed": len(timed),
        "samples_per_s": round(n_samples * len(timed) / sum(timed), 1),
        "first_batch_s": round(out["first_batch_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if device.startswith("cuda"):
        row["gpu"] = torch.cuda.get_device_name()
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def run_in_subprocess(impl: str, case: str, batch_size: int, device: str, epochs: int,
                      max_train: int | None, amp: bool | None = None,
                      folds: Sequence[int] = (0,), ensemble: int = 1,
                      cuda_graphs: bool = False,
                      dim_feedforward: int = TORCH_FEEDFORWARD) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, "--cases", case,
           "--batch-sizes", str(batch_size), "--device", device, "--epochs",
           str(epochs), "--folds", *map(str, folds), "--ensemble", str(ensemble),
           "--dim-feedforward", str(dim_feedforward)]
    if cuda_graphs:
        cmd.append("--cuda-graphs")
    if max_train:
        cmd += ["--max-train", str(max_train)]
    if amp is not None:
        cmd.append("--amp" if amp else "--no-amp")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"{impl} {case} bs {batch_size} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label_speed(workers: Sequence[int], n_structures: int | None) -> list[dict]:
    """Wyckoff labels per second on matbench_phonons: spglib vs moyopy, one process
    vs several, and the share of labels (and space groups) the two tools agree on."""
    from mat_bench.data import load_raw_task
    from mat_bench.wyckoff import label_structures

    structures = list(load_raw_task("matbench_phonons").structure)[:n_structures]
    rows, labels = [], {}
    for backend in ("spglib", "moyopy"):
        for n_proc in workers:
            start = time.perf_counter()
            result = label_structures(structures, tool=backend, workers=n_proc,
                                      desc=f"{backend} x{n_proc}")
            seconds = time.perf_counter() - start
            labels[backend] = [label for label, _ in result]
            rows.append({"backend": backend, "workers": n_proc,
                         "structures": len(structures),
                         "labels_per_s": round(len(structures) / seconds, 1),
                         "failed": sum(label is None for label, _ in result)})
    pairs = [(a, b) for a, b in zip(labels["spglib"], labels["moyopy"], strict=True)
             if a and b]
    spg = lambda label: label.split(":")[0].split("_")[2]  # noqa: E731
    rows.append({"backend": "spglib vs moyopy", "structures": len(pairs),
                 "identical_labels_pct": round(
                     100 * np.mean([a == b for a, b in pairs]), 2),
                 "same_spacegroup_pct": round(
                     100 * np.mean([spg(a) == spg(b) for a, b in pairs]), 2)})
    return rows


def summarize(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per implementation from its repeated runs: the median samples/s, the
    range, and (for ours) the median ratio to aviary over runs made side by side."""
    rows = []
    for impl_runs in runs.values():
        speeds = [run["samples_per_s"] for run in impl_runs]
        row = {**impl_runs[0], "samples_per_s": round(float(np.median(speeds)), 1),
               "first_batch_s": round(float(np.median(
                   [run["first_batch_s"] for run in impl_runs])), 2),
               "peak_rss_mb": max(run["peak_rss_mb"] for run in impl_runs)}
        if "cuda_peak_mb" in row:
            row["cuda_peak_mb"] = max(run["cuda_peak_mb"] for run in impl_runs)
        if len(speeds) > 1:
            row.update(runs=len(speeds), samples_per_s_min=min(speeds),
                       samples_per_s_max=max(speeds))
        rows.append(row)
    if set(runs) == {"aviary", "ours"}:
        ratios = [ours["samples_per_s"] / aviary["samples_per_s"]
                  for aviary, ours in zip(runs["aviary"], runs["ours"], strict=True)]
        rows[list(runs).index("ours")]["speedup_vs_aviary"] = round(
            float(np.median(ratios)), 2)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |"
              for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                        choices=list(CASES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="epochs per measurement; all but the first are timed")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="runs per implementation, interleaved; medians are "
                        "reported")
    parser.add_argument("--max-train", type=int, default=None,
                        help="cut each training set to this many rows")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 in our trainer: autocast on CUDA, a bf16 model "
                        "copy on a CPU (default: on for CUDA, as in run_matbench.py)")
    parser.add_argument("--folds", nargs="+", type=int, default=[0],
                        help="training folds: aviary trains one after another, ours "
                        "stacks them into one model")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="models per fold in ours (stacked)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="ours: the whole step in a CUDA graph (CUDA, Roostformer)")
    parser.add_argument("--labels", action="store_true",
                        help="measure Wyckoff labelling speed instead of training")
    parser.add_argument("--label-workers", nargs="+", type=int,
                        default=[1, os.cpu_count() or 1])
    parser.add_argument("--label-structures", type=int, default=None,
                        help="label only the first N phonons structures")
    parser.add_argument("--json-out", default=None, help="also write rows as JSON")
    parser.add_argument("--dim-feedforward", type=int, default=TORCH_FEEDFORWARD,
                        help="ours only: the encoder's feed-forward width")
    parser.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dim_feedforward != TORCH_FEEDFORWARD and "aviary" in (
            [args.one] if args.one else args.impls):
        parser.error(f"aviary's loop trains at torch's width {TORCH_FEEDFORWARD}: "
                     "add --impls ours to measure another --dim-feedforward")

    if args.one:  # a single measurement, in a fresh process, for run_in_subprocess
        print(json.dumps(measure(args.one, args.cases[0], args.batch_sizes[0],
                                 args.device, args.epochs, args.max_train,
                                 args.amp, args.folds, args.ensemble,
                                 args.cuda_graphs, args.dim_feedforward)))
        return 0
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | device {args.device}", flush=True)
    if args.labels:
        rows = label_speed(args.label_workers, args.label_structures)
    else:
        rows = []
        for case in args.cases:
            for batch_size in args.batch_sizes:
                runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
                for _ in range(args.repeats):  # interleaved: drift hits both alike
                    for impl in args.impls:
                        row = run_in_subprocess(
                            impl, case, batch_size, args.device, args.epochs,
                            args.max_train, args.amp, args.folds, args.ensemble,
                            args.cuda_graphs, args.dim_feedforward)
                        runs[impl].append(row)
                        print(json.dumps(row), flush=True)
                rows += summarize(runs)
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump(rows, file, indent=1)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
