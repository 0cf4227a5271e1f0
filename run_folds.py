r"""Run many (task, fold) jobs of run_matbench.py on one machine, a few at a time, or
with --per-task one job per task training its folds together (stacked), and skip
the folds a run has already recorded: a workstation's resumable alternative to
slurm_submit.py. With --grid, one run per combination of hyperparameters (a search
on the validation split of the training folds: its table shows validation metrics
only, never the test fold's).

Examples:
    python run_folds.py --model roostformer --run-name roostformer \
        --tasks matbench_steels matbench_expt_gap                  # all 5 folds each
    python run_folds.py --model wrenformer --run-name wrenformer \
        --tasks matbench_phonons --parallel 4 --device cuda   # 4 folds at once on a GPU
    python run_folds.py --model roostformer --run-name search --tasks matbench_steels \
        --folds 0 --grid frac_encoding_dims=0,64 learning_rate=5e-4,1e-3  # validation
    python run_folds.py --model wrenformer --run-name curve --tasks matbench_phonons \
        --per-task --curves curves.csv  # validation every 10 epochs, all folds
    python run_folds.py --model roostformer --run-name roostformer --per-task \
        --tasks matbench_log_gvrh matbench_log_kvrh --checkpoint local  # folds stacked

Flags it does not know go to run_matbench.py unchanged. Logs: OUT_DIR/job-logs/.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mat_bench import ALL_TASKS, N_FOLDS, ROOT, TASK_INFO
from mat_bench.data import (
    ArgumentParser,
    UserError,
    check_fold,
    check_task,
    read_json_results,
)
from mat_bench.runs import (
    MODELS,
    PARENT_PID_ENV,
    check_run_args,
    check_run_name,
    check_same_recipe,
    check_task_recipe,
    done_pairs,
    run_matbench_args,
    scores_path,
)


def grid_flag(key: str, value: str) -> list[str]:
    """run_matbench flags for one grid value: `--key value`, or for true and false
    (switches such as gate=true,false) `--key` and `--no-key`."""
    flag = key.replace("_", "-")
    if value.lower() in ("true", "false"):
        return [f"--{flag}" if value.lower() == "true" else f"--no-{flag}"]
    return [f"--{flag}", value]


def grid_runs(run_name: str, grid: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(run name, extra run_matbench flags) per combination of `key=v1,v2` specs."""
    if not grid:
        return [(run_name, [])]
    keys, values = [], []
    for spec in grid:
        key, sep, vals = spec.partition("=")
        if not sep or not vals:
            raise UserError(f"--grid takes key=value1,value2,..., got {spec!r}")
        keys.append(key)
        values.append(vals.split(","))
    runs = []
    for combo in itertools.product(*values):
        name = run_name + "".join(f"-{k}={v}" for k, v in zip(keys, combo, strict=True))
        flags = [f for k, v in zip(keys, combo, strict=True)
                 for f in grid_flag(k, v)]
        runs.append((name, flags))
    return runs


class Jobs:
    """Runs run_matbench.py jobs, a few at a time, each in its own session so that
    this process alone hears Ctrl-C. SIGINT, SIGTERM or SIGHUP here is passed on
    once (SIGHUP as SIGTERM) to the jobs running: each saves a checkpoint after its
    epoch (with --checkpoint) and stops; no new job starts. A second signal is
    passed on again, and stops them at once. If this process dies, even by
    SIGKILL, the jobs get SIGTERM (Linux; runs.stop_when_parent_dies)."""

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # a second signal may arrive inside it
        self.stop_signal: int | None = None
        # a job stops (with a checkpoint) if this process dies, even by SIGKILL
        self.env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}

    def run(self, cmd: list[str], log_path: Path) -> int | None:
        """The job's exit code; None if it was not started (asked to stop)."""
        with self.lock:
            if self.stop_signal is not None:
                return None
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:  # the job holds its own copy
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.env)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def on_signal(self, signum: int, _frame: object) -> None:
        with self.lock:
            self.stop_signal = signum
            running = list(self.running)
        print(f"{signal.Signals(signum).name}: no new jobs; the running ones save a "
              "checkpoint after this epoch (with --checkpoint) and stop (a second "
              "signal stops them at once)", file=sys.stderr, flush=True)
        passed = signal.SIGTERM if signum == signal.SIGHUP else signum
        for proc in running:
            proc.send_signal(passed)


VALIDATION_COLUMNS = {  # validation metrics of a fold's scores entry, by task type
    "regression": ("val_mae",),
    "classification": ("val_rocauc_prob", "val_balanced_accuracy_default",
                       "val_balanced_accuracy_crossfit",
                       "val_balanced_accuracy_prior"),
}


NESTED_COLUMNS = {  # fields of a fold's scores entry: column -> (entry key, field)
    "val_median": ("val_by_aggregation", "median"),  # the members' median
    # the epoch levers measured beside a run's recipe
    "val_swa": ("val_swa", "ensemble"),
    "val_epoch_chosen": ("val_epoch_choice", "chosen"),
    "val_epoch_final": ("val_epoch_choice", "final"),
}


def validation_table(out_dir: Path, run_names: Sequence[str]) -> pd.DataFrame:
    """Mean validation metrics per run and task over its folds (never the test
    fold's scores): the ensemble's metric (`val_mae` or `val_rocauc_prob`, the
    probabilities' ROC-AUC; with the median of the members in `val_median`), and
    for classification the labels' balanced accuracy (Matbench's ROC-AUC of
    labels) at 0.5, at a threshold chosen on the validation split (cross-fitted)
    and at the training split's share of class 1 (where recorded). Where every fold
    recorded them, the epoch levers in the same metric: the ensemble of the
    members' averaged last weights (`val_swa`) and of each member's epoch chosen on
    one half of the split, scored on the other (`val_epoch_chosen`, with the last
    epoch scored on the same halves in `val_epoch_final`)."""
    rows = []
    for name in run_names:
        for task, folds in read_json_results(scores_path(out_dir, name)).items():
            task_type = TASK_INFO[task].task_type
            first = VALIDATION_COLUMNS[task_type][0]
            entries = [f for f in folds.values() if first in f]
            if not entries:
                continue
            row: dict = {"run": name, "task": task, "folds": len(entries),
                         "ensemble": entries[0].get("ensemble", 1)}
            for key in VALIDATION_COLUMNS[task_type]:
                if all(key in f for f in entries):
                    row[key] = float(np.mean([f[key] for f in entries]))
            for column, (key, field) in NESTED_COLUMNS.items():
                if all(key in f for f in entries):
                    row[column] = float(np.mean([f[key][field] for f in entries]))
            rows.append(row)
    return pd.DataFrame(rows)


def validation_curves(out_dir: Path, run_names: Sequence[str]) -> pd.DataFrame:
    """The learning curve on validation per run and task: at each recorded epoch,
    the mean over its folds and their members of each member's validation metric
    (`val_mae` or `val_rocauc_prob`), with the worst and best fold's mean."""
    rows = []
    for name in run_names:
        for task, folds in read_json_results(scores_path(out_dir, name)).items():
            curves = [f["val_curve"] for f in folds.values() if "val_curve" in f]
            if not curves:
                continue
            metric = VALIDATION_COLUMNS[TASK_INFO[task].task_type][0]
            by_epoch: dict[int, list[float]] = {}  # epoch -> each fold's mean
            for curve in curves:
                for k, epoch in enumerate(curve["epochs"]):
                    by_epoch.setdefault(epoch, []).append(
                        float(np.mean([member[k] for member in curve["members"]])))
            for epoch, fold_means in sorted(by_epoch.items()):
                rows.append({"run": name, "task": task, "epoch": epoch,
                             "folds": len(fold_means), metric: np.mean(fold_means),
                             "fold_min": min(fold_means),
                             "fold_max": max(fold_means)})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--run-name", required=True, help="results file name; with "
                        "--grid, the prefix of each combination's")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS),
                        help="Matbench tasks (default: all 13)")
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(N_FOLDS)),
                        help="folds of each task")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at once")
    parser.add_argument("--per-task", action="store_true",
                        help="one job per task, its missing folds stacked in one model")
    parser.add_argument("--out-dir", default=ROOT, help="folder for model_scores/, "
                        "model_preds/, checkpoints/ and job-logs/")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="one run per combination of hyperparameter values "
                        "(switches: key=true,false)")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="after running the folds not yet recorded, write "
                        "the validation table (mean validation metrics of each "
                        "run and task) here; it trains nothing once all are")
    parser.add_argument("--curves", default=None, metavar="CSV",
                        help="also write the learning curves on validation (each "
                        "run and task's mean member validation metric every 10 "
                        "epochs) here")
    args, passthrough = parser.parse_known_args(argv)
    out_dir = Path(args.out_dir)
    try:
        for task in args.tasks:
            check_task(task)
        for fold in args.folds:
            check_fold(fold)
        if args.parallel < 1:
            raise UserError("--parallel must be at least 1")
        runs = grid_runs(args.run_name, args.grid)
        recipes = {}  # run name -> (hyperparameters, ensemble size)
        for name, flags in runs:  # every job's flags, checked before any job starts
            check_run_name(name)
            recipes[name] = check_run_args(
                run_matbench_args(args.model, name, out_dir, [*flags, *passthrough],
                                  "0", False, args.per_task),
                args.model, name, out_dir, False, caller="run_folds.py",
                tasks=args.tasks)
        done = {name: done_pairs(scores_path(out_dir, name), args.model)
                for name, _ in runs}
        jobs = []
        for (name, flags), task in itertools.product(runs, args.tasks):
            todo = []
            for fold in args.folds:
                if (task, fold) in done[name]:
                    print(f"skip {name} {task} fold {fold}: already recorded")
                else:
                    todo.append(fold)
            if todo:  # new folds join a task's recorded ones only at their recipe
                check_task_recipe(args.model, task, recipes[name][0])
                check_same_recipe(scores_path(out_dir, name), args.model, task,
                                  *recipes[name])
            groups = [todo] if args.per_task and todo else [[fold] for fold in todo]
            for folds in groups:
                tag = "-".join(map(str, folds))
                cmd = [sys.executable, "run_matbench.py", "--model", args.model,
                       "--task", task, "--folds", *map(str, folds), "--run-name",
                       name, "--out-dir", str(out_dir), "--no-progress", *flags,
                       *passthrough]
                log = out_dir / "job-logs" / f"{name}-{task}-fold_{tag}.log"
                jobs.append((cmd, log))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} jobs, {args.parallel} at a time", flush=True)
    start = time.perf_counter()
    runner = Jobs()
    handlers = {sig: signal.signal(sig, runner.on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            codes = list(pool.map(lambda job: runner.run(*job), jobs))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    failed = [log for (_, log), code in zip(jobs, codes, strict=True) if code]
    print(f"{codes.count(0)}/{len(jobs)} jobs done in "
          f"{time.perf_counter() - start:.0f} s")
    for log in failed:  # a job stopped by a signal is not a failure
        how = "stopped" if runner.stop_signal is not None else "failed"
        print(f"{how}: see {os.path.relpath(log)}", file=sys.stderr)
    if runner.stop_signal is not None:
        print(f"stopped by {signal.Signals(runner.stop_signal).name}: "
              f"{codes.count(None)} jobs not started; the same command resumes "
              "(recorded folds are skipped, checkpoints resume)", file=sys.stderr)
        return 128 + runner.stop_signal
    if args.grid or args.table:
        table = validation_table(out_dir, [name for name, _ in runs])
        if len(table):
            print(table.to_string(index=False))
            if args.table:
                Path(args.table).parent.mkdir(parents=True, exist_ok=True)
                table.to_csv(args.table, index=False, float_format="%.5g")
    if args.curves:
        curves = validation_curves(out_dir, [name for name, _ in runs])
        Path(args.curves).parent.mkdir(parents=True, exist_ok=True)
        curves.to_csv(args.curves, index=False, float_format="%.5g")
        print(f"learning curves: {len(curves)} rows -> {args.curves}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
