"""Everything this project measures on a lent GPU, in one call, within a time budget
(benchmarks/gpu_check.sh sets up the machine and runs this):

1. graphs vs eager: the CUDA-graph training step and the eager step train the same
   two stacked members for 3 epochs (fp32 and bf16); their test predictions must
   agree to rounding.
2. throughput: benchmark_training.py rows on this GPU: aviary's loop and ours at
   batch 32 on one fold; ours with CUDA graphs at batch 32, 128 and 256, one member
   and 5 folds stacked; mp_e_form with 5 folds x 4 members at 256 per member.
3. seeds: run_matbench.py on expt_gap fold 0 with --ensemble 3 (seeds 0-2), eager
   and with --cuda-graphs, at --epochs 100: the members' test MAEs side by side.
4. results: Roostformer on matbench_mp_e_form, mp_gap and mp_is_metal, 5 folds
   stacked per task, with --cuda-graphs at batch 256, at as many epochs (up to 300,
   a multiple of 10) as the time left allows, measured from stage 2's throughput.

OUT/gpu_check.json is rewritten after every stage, so a stage that fails or runs
out of time leaves the others' results; stage 4's model_scores/ and model_preds/
files come back gzipped as OUT/model_scores-RUN.json.gz and
OUT/model_preds-RUN-TASK.json.gz.
--cpu-smoke runs stages 2-4 tiny on a CPU, to check this harness before a lease.

Example (on the GPU machine, after benchmarks/prepare_gpu_check.sh here):
    OUT=some/folder bash benchmarks/gpu_check.sh --budget 560
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # stages' own files
DEVICE, SMOKE = "cuda", False  # --cpu-smoke: every stage but 1, tiny, on the CPU
TINY = ["--d-model", "16", "--n-heads", "2", "--n-attn-layers", "1", "--epochs", "1"]
LARGE_TASKS = ("matbench_mp_e_form", "matbench_mp_gap", "matbench_mp_is_metal")
RESULTS_RUN = "roostformer-gpu"
RESULTS_BATCH = 256  # per member: keeps mp_e_form's MAE (BENCHMARKS.md, v1)


def graphs_match_eager() -> dict[str, Any]:
    """Stage 1: test predictions of graphed and eager training, 2 members, 3 epochs."""
    import numpy as np
    import pandas as pd
    import torch

    from mat_bench import training
    from mat_bench.data import get_fold_ids, load_featurized

    dev = torch.device("cuda")
    df = load_featurized("matbench_expt_gap")
    train_ids, test_ids = get_fold_ids("matbench_expt_gap", 0)
    rows = pd.concat([df.loc[train_ids], df.loc[test_ids]])
    data = training.TaskData(training.tokenize("roostformer", list(rows.composition)),
                             rows.target.to_numpy(np.float32), dev)
    n_train = len(train_ids)
    members = [training.Member(0, seed, np.arange(n_train), np.arange(0))
               for seed in (0, 1)]
    test = np.arange(n_train, len(rows))
    targets = rows.target.to_numpy()[test]
    out: dict[str, Any] = {}
    for amp in (False, True):
        preds, seconds = {}, {}
        for graphs in (False, True):
            cfg = training.TrainConfig("regression", 3, batch_size=64, amp=amp,
                                       cuda_graphs=graphs)
            state = training.new_train_state(
                "roostformer", data, members, cfg, frac_encoding_dims=64, d_model=128,
                n_attn_layers=3, n_attn_heads=4)
            start = time.perf_counter()
            training.train(state, data, cfg, progress=False)
            seconds[graphs] = round(time.perf_counter() - start, 2)
            preds[graphs] = np.stack(training.predict(state, data, [test, test], cfg))
        diff = np.abs(preds[True] - preds[False])
        out["bf16" if amp else "fp32"] = {
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / np.abs(preds[False]).mean()),
            "test_mae_eager": [float(np.abs(p - targets).mean()) for p in preds[False]],
            "test_mae_graphs": [float(np.abs(p - targets).mean()) for p in preds[True]],
            "train_seconds_eager": seconds[False],
            "train_seconds_graphs": seconds[True],
        }
    return out


BENCH_ROWS = {  # name -> benchmark_training.py flags (--device cuda --repeats 1)
    "bs32_aviary_vs_eager": ["--cases", "roostformer-expt_gap", "--batch-sizes", "32"],
    "graphs_one_member": ["--cases", "roostformer-expt_gap", "--impls", "ours",
                          "--cuda-graphs", "--batch-sizes", "32", "128", "256"],
    "graphs_5_folds_bs32": ["--cases", "roostformer-expt_gap", "--impls", "ours",
                            "--cuda-graphs", "--batch-sizes", "32", "--folds", "0",
                            "1", "2", "3", "4"],
    "mp_e_form_5x4_bs256": ["--cases", "roostformer-mp_e_form", "--impls", "ours",
                            "--cuda-graphs", "--batch-sizes", "256", "--folds", "0",
                            "1", "2", "3", "4", "--ensemble", "4", "--epochs", "2"],
    "mp_e_form_5x1_bs256": ["--cases", "roostformer-mp_e_form", "--impls", "ours",
                            "--cuda-graphs", "--batch-sizes", "256", "--folds", "0",
                            "1", "2", "3", "4", "--epochs", "2"],
}


def smoke(cmd: list[str], cpu_flags: list[str]) -> list[str]:
    """With --cpu-smoke: the command without CUDA graphs, tiny, on the CPU."""
    if not SMOKE:
        return cmd
    return [arg for arg in cmd if arg != "--cuda-graphs"] + cpu_flags


def throughput(deadline: float) -> dict[str, Any]:
    """Stage 2: benchmark_training.py rows, each in its own processes."""
    out: dict[str, Any] = {}
    for name, flags in BENCH_ROWS.items():
        rows_path = SCRATCH / f"rows_{name}.json"
        cmd = smoke([sys.executable, "benchmark_training.py", "--device", DEVICE,
                     "--repeats", "1", "--json-out", str(rows_path), *flags],
                    ["--max-train", "100", "--epochs", "2"])
        out[name] = run(cmd, deadline)
        if rows_path.is_file():
            out[name]["rows"] = json.loads(rows_path.read_text())
    return out


def seeds(deadline: float) -> dict[str, Any]:
    """Stage 3: the same 3-member ensemble run eagerly and with CUDA graphs."""
    from mat_bench.data import read_json_results

    out: dict[str, Any] = {}
    for name, extra in (("graphs", ["--cuda-graphs"]), ("eager", [])):
        cmd = [sys.executable, "run_matbench.py", "--model", "roostformer", "--task",
               "matbench_expt_gap", "--fold", "0", "--ensemble", "3", "--epochs", "100",
               "--run-name", name, "--out-dir", str(SCRATCH / "seeds"), "--no-progress",
               "--device", DEVICE, *extra]
        cmd = smoke(cmd, ["--epochs", "2", *TINY])
        out[name] = run(cmd, deadline)
        scores = read_json_results(SCRATCH / "seeds" / "model_scores" / f"{name}.json")
        if scores:
            entry = scores["matbench_expt_gap"]["fold_0"]
            out[name].update(ensemble_mae=entry["mae"],
                             member_mae=[m["mae"] for m in entry["members"]],
                             samples_per_sec=entry["samples_per_sec"],
                             train_seconds=entry["train_seconds"])
    return out


def large_task_results(deadline: float, samples_per_s: float | None, out_dir: Path
                       ) -> dict[str, Any]:
    """Stage 4: the three large tasks, 5 folds stacked each, epochs fitted to the
    time left (rule: the most epochs, a multiple of 10 up to 300, whose estimated
    time fits; estimate = samples / stage 2's 5-fold throughput x 1.25 for
    validation, plus 20 s per process)."""
    from mat_bench import TASK_INFO  # noqa: F401  (fails early if imports break)
    from mat_bench.data import get_fold_ids

    tasks = ("matbench_steels",) if SMOKE else LARGE_TASKS
    n_fit = {task: 0.9 * sum(len(get_fold_ids(task, fold)[0]) for fold in range(5))
             for task in tasks}
    left = deadline - time.time() - 20 * len(tasks)
    per_epoch = sum(n_fit.values()) / (samples_per_s or 300_000) * 1.25
    epochs = int(min(300, left / per_epoch) // 10 * 10) if not SMOKE else 1
    out: dict[str, Any] = {"epochs": epochs, "estimated_seconds_per_epoch": per_epoch,
                           "samples_per_s_assumed": samples_per_s}
    if epochs < 1:
        out["skipped"] = "not enough time left for 10 epochs"
        return out
    for task in tasks:
        cmd = [sys.executable, "run_matbench.py", "--model", "roostformer", "--task",
               task, "--folds", "0", "1", "2", "3", "4", "--cuda-graphs",
               "--batch-size", str(RESULTS_BATCH), "--epochs", str(epochs),
               "--run-name", RESULTS_RUN, "--out-dir", str(out_dir), "--no-progress",
               "--device", DEVICE]
        out[task] = run(smoke(cmd, TINY), deadline)
    for path in out_dir.glob("model_scores/*.json"):  # small enough to come back
        with open(path, "rb") as src, gzip.open(out_dir.parent / (
                f"model_scores-{path.name}.gz"), "wb") as dest:
            shutil.copyfileobj(src, dest)
    for path in out_dir.glob("model_preds/*/*.json.gz"):  # gzipped per task already
        shutil.copyfile(path, out_dir.parent / f"model_preds-{path.parent.name}-"
                                               f"{path.name}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def run(cmd: list[str], deadline: float) -> dict[str, Any]:
    """Run a command from the repository root until the deadline; its status, time
    and the tail of its output."""
    start = time.perf_counter()
    timeout = max(1.0, deadline - time.time())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = "timeout", str(exc.stdout or "") + str(exc.stderr or "")
    seconds = round(time.perf_counter() - start, 1)
    print(f"[{seconds:6.1f} s, exit {code}] {' '.join(cmd[1:])}", flush=True)
    print("\n".join(output.strip().splitlines()[-6:]), flush=True)
    return {"cmd": " ".join(cmd[1:]), "exit": code, "seconds": seconds,
            "tail": output[-1500:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for all stages together")
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the harness on a CPU: stages 2-4, tiny, no graphs")
    args = parser.parse_args()
    global DEVICE, SMOKE
    if args.cpu_smoke:
        DEVICE, SMOKE = "cpu", True
        args.stages = [s for s in args.stages if s != 1]
    deadline = time.time() + args.budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if not SMOKE else None,
        "torch": torch.__version__, "budget_s": args.budget}

    def stage(name: str, func, *func_args) -> Any:
        start = time.perf_counter()
        try:
            report[name] = func(*func_args)
        except Exception:
            report[name] = {"error": traceback.format_exc()[-3000:]}
            print(report[name]["error"], flush=True)
        report[name + "_seconds"] = round(time.perf_counter() - start, 1)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
        print(f"== {name} done in {report[name + '_seconds']} s", flush=True)
        return report[name]

    if 1 in args.stages:
        stage("graphs_match_eager", graphs_match_eager)
    if 2 in args.stages:
        stage("throughput", throughput, deadline - 300)
    if 3 in args.stages:
        stage("seeds", seeds, deadline - 200)
    if 4 in args.stages:
        rows = report.get("throughput", {}).get("mp_e_form_5x1_bs256", {}).get("rows")
        speed = rows[0]["samples_per_s"] if rows else None
        stage("large_tasks", large_task_results, deadline, speed, out_dir / "results")
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
