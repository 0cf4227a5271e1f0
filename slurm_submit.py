r"""Run the Matbench benchmark on a SLURM cluster as one job array: one element per
(task, fold) pair, or with --per-task one per task training its folds together
(stacked), each running run_matbench.py, all merging into the same
OUT_DIR/model_scores/RUN.json and OUT_DIR/model_preds/RUN/TASK.json.gz.

Examples:
    # Roostformer on all 13 tasks x 5 folds, one A100 per element, 10 at a time
    python slurm_submit.py --model roostformer --run-name roost-v1 \
        --partition ampere --account MYPROJECT --gpus-per-node a100:1 \
        --time 12:00:00 --max-parallel 10 \
        --pre-cmd "module load cuda/12.1; source ~/venvs/matbench/bin/activate"
    # Wrenformer on the structure tasks with Wyckoff labels, CPU only, resumable
    python slurm_submit.py --model wrenformer --run-name wren-v1 --gpus-per-node 0 \
        --cpus-per-task 8 --epochs 300 --d-model 256 --requeue
    # two tasks, folds 0 and 1, show what would be submitted
    python slurm_submit.py --model roostformer --run-name try --tasks matbench_steels \
        matbench_expt_gap --folds 0 1 --epochs 5 --dry-run
    # one element per task, its 5 folds x 4 seeds stacked on one GPU
    python slurm_submit.py --model roostformer --run-name roost-ens --per-task \
        --ensemble 4 --batch-size 256 --cuda-graphs --time 2:00:00
    # after failures or time limits: submit only the folds the scores file lacks
    python slurm_submit.py --model roostformer --run-name roost-v1 --only-missing

Any flag that slurm_submit.py does not know (--epochs, --d-model, --robust, --wandb,
...) goes to run_matbench.py unchanged, after a check against run_matbench.py's own
parser. Values that start with a dash need `=`: --sbatch-args="--qos=high".

The job script and one log per element go to OUT_DIR/job-logs/ (--log-dir), named
RUN-<timestamp>.sh and RUN-<array job id>_<element>.log; the script's header holds
the exact sbatch command. Featurize the tasks first (featurize_matbench.py); the
submitting shell's environment (MATBENCH_DATA_DIR, a virtualenv's PATH) reaches the
elements (sbatch exports it), and --pre-cmd runs in each element before Python.

With --requeue, elements save checkpoints (run_matbench.py --checkpoint local).
SLURM signals the element's shell --grace seconds before its time limit (USR1);
the shell asks run_matbench.py to checkpoint and stop (SIGTERM), then requeues the
element, which resumes from its last checkpoint. A preempted element gets SIGTERM
(saving a checkpoint if the partition's GraceTime allows, otherwise the last one
of every 10 epochs counts) and SLURM requeues it. A cancelled element stays so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mat_bench import ROOT
from mat_bench.data import ArgumentParser, UserError
from mat_bench.runs import (
    FOLD_VAR,
    FOLDS_VAR,
    MODELS,
    TASK_VAR,
    check_run_args,
    check_run_name,
    check_same_recipe,
    check_task_recipe,
    done_pairs,
    gpu_count,
    run_matbench_args,
    scores_path,
    select_pairs,
)

# sbatch defaults in one place; every one has a flag
DEFAULTS: dict[str, Any] = {
    "partition": None,  # None: the cluster's default partition
    "account": None,  # None: the user's default account
    "time": "24:00:00",  # per element
    "gpus_per_node": "1",  # N or TYPE:N (a100:1); 0 on a CPU cluster
    "cpus_per_task": 4,
    "mem": "16G",
    "max_parallel": None,  # None: as many elements at once as the scheduler allows
    "grace": 300,  # seconds before the time limit when a --requeue element stops
}
RUN_SCRIPT = Path(ROOT) / "run_matbench.py"


# --- the job ----------------------------------------------------------------------
def shell_command(args: Sequence[str]) -> str:
    """`python run_matbench.py ARGS` as one shell-quoted line."""
    return " ".join(["python", shlex.quote(str(RUN_SCRIPT))] + [
        arg if arg in (TASK_VAR, FOLD_VAR, FOLDS_VAR) else shlex.quote(arg)
        for arg in args])


def sbatch_options(args: argparse.Namespace, n_elements: int,
                   log_dir: str | os.PathLike) -> list[str]:
    """sbatch's options for the array: resources, one log per element, requeueing."""
    array = f"0-{n_elements - 1}"
    if args.max_parallel:
        array += f"%{args.max_parallel}"
    opts = [
        f"--job-name={args.run_name}",
        f"--array={array}",
        f"--output={Path(log_dir) / f'{args.run_name}-%A_%a.log'}",
        f"--time={args.time}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={args.cpus_per_task}",
    ]
    if args.partition:
        opts.append(f"--partition={args.partition}")
    if args.account:
        opts.append(f"--account={args.account}")
    if args.mem:
        opts.append(f"--mem={args.mem}")
    if gpu_count(args.gpus_per_node) > 0:
        opts.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.requeue:
        opts += ["--requeue", f"--signal=B:USR1@{args.grace}", "--open-mode=append"]
    return opts + shlex.split(args.sbatch_args or "")


def group_by_task(pairs: Sequence[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """(task, folds) per task, in the pairs' order: one element per task."""
    folds: dict[str, list[int]] = {}
    for task, fold in pairs:
        folds.setdefault(task, []).append(fold)
    return list(folds.items())


def job_script(elements: Sequence[tuple[str, int | Sequence[int]]], command: str,
               sbatch_cmd: str, pre_cmd: str | None, requeue: bool) -> str:
    """The array's batch script: element i runs `command` for elements[i], a (task,
    fold) pair or, per task, (task, folds)."""
    per_task = not isinstance(elements[0][1], int)
    pair_lines = "\n".join(
        f"  '{task} {' '.join(map(str, folds)) if per_task else folds}'"
        for task, folds in elements)
    what = "task (and its folds)" if per_task else "(task, fold) pair"
    fold_var = "FOLDS" if per_task else "FOLD"
    lines = [
        "#!/bin/bash",
        f"# Matbench job array written by slurm_submit.py on "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}, submitted with:",
        f"#   {sbatch_cmd}",
        f"# One element per {what} below; SLURM_ARRAY_TASK_ID indexes them.",
        "set -eo pipefail",
        "",
        f"PAIRS=(\n{pair_lines}\n)",
        f'read -r TASK {fold_var} <<< "${{PAIRS[$SLURM_ARRAY_TASK_ID]}}"',
        'echo "[$(date -Is)] element ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} '
        '(job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): '
        f'$TASK fold{"s" if per_task else ""} ${fold_var}"',
        "",
    ]
    if pre_cmd:
        lines += ["# --pre-cmd", pre_cmd, ""]
    lines += [
        "# one thread per allocated CPU unless set already",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        f"cd {shlex.quote(ROOT)}",
    ]
    if not requeue:
        # exec: the Python process is the batch shell and gets SLURM's signals
        lines.append(f"exec {command}")
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "# USR1 (sbatch --signal) comes shortly before the time limit: tell Python to",
        "# checkpoint and stop (SIGTERM), then requeue this element, which resumes.",
        "# SIGTERM (preemption, scancel) is passed on the same way; SLURM itself",
        "# requeues a preempted element, a cancelled one stays cancelled.",
        "set +e",
        f"{command} &",
        "child=$!",
        "time_up=0",
        "trap 'time_up=1; kill -TERM $child 2>/dev/null' USR1",
        "trap 'kill -TERM $child 2>/dev/null' TERM",
        "wait $child; status=$?",
        "# a trapped signal ends `wait` early: wait until Python has really exited",
        "while kill -0 $child 2>/dev/null; do wait $child; status=$?; done",
        'if [[ $time_up == 1 && $status != 0 ]]; then',
        '  echo "[$(date -Is)] time limit near: requeueing job $SLURM_JOB_ID to '
        'resume from its checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


def check_sbatch() -> None:
    """Raise UserError if there is no sbatch to submit with."""
    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch not found: this machine has no SLURM client on PATH. Run on the "
            "cluster's login node, or use --dry-run to print the job script and the "
            "sbatch command without submitting"
        )


def submit(sbatch_cmd: Sequence[str]) -> str:
    """Run sbatch and return the job id; UserError if sbatch refuses the job."""
    result = subprocess.run(sbatch_cmd, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or
                   f"exit status {result.returncode}")
        raise UserError(f"sbatch rejected the job: {message}")
    # --parsable prints "jobid" or "jobid;cluster"
    return result.stdout.strip().splitlines()[-1].split(";")[0]


# --- command line -----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """slurm_submit.py's own flags; the rest go to run_matbench.py."""
    parser = ArgumentParser(
        description=__doc__,
        allow_abbrev=False,  # never swallow a run_matbench.py flag as a prefix
    )
    run = parser.add_argument_group("what to run")
    run.add_argument("--model", required=True, choices=MODELS)
    run.add_argument("--run-name", required=True,
                     help="results file name shared by every element")
    run.add_argument("--tasks", nargs="+", metavar="T", help="default: all tasks "
                     "the model can run")
    run.add_argument("--folds", nargs="+", type=int, metavar="F",
                     help="default: 0 1 2 3 4")
    run.add_argument("--out-dir", default=ROOT,
                     help="folder for model_scores/, model_preds/, checkpoints/ "
                     "(default: the repository)")
    run.add_argument("--log-dir", default=None,
                     help="job script and logs (default: OUT_DIR/job-logs)")
    run.add_argument("--per-task", action="store_true",
                     help="one element per task, training its folds together "
                     "(run_matbench.py --folds, stacked), as the original did; "
                     "default: one element per (task, fold)")
    run.add_argument("--only-missing", action="store_true",
                     help="submit only the pairs the run's scores file lacks")
    run.add_argument("--dry-run", action="store_true",
                     help="print the sbatch command and job script, submit nothing")
    slurm = parser.add_argument_group("sbatch options")
    slurm.add_argument("--partition", default=DEFAULTS["partition"],
                       help="default: the cluster's default partition")
    slurm.add_argument("--account", default=DEFAULTS["account"],
                       help="default: your default account")
    slurm.add_argument("--time", default=DEFAULTS["time"],
                       help="time limit per element (default: %(default)s)")
    slurm.add_argument("--gpus-per-node", default=DEFAULTS["gpus_per_node"],
                       metavar="[TYPE:]G", help="GPUs per element, e.g. 1 or a100:1; "
                       "0 for CPU only (default: %(default)s)")
    slurm.add_argument("--cpus-per-task", type=int, default=DEFAULTS["cpus_per_task"],
                       help="default: %(default)s")
    slurm.add_argument("--mem", default=DEFAULTS["mem"],
                       help="memory per element, '' for the cluster's default "
                       "(default: %(default)s)")
    slurm.add_argument("--max-parallel", type=int, default=DEFAULTS["max_parallel"],
                       metavar="K", help="at most K elements at once (array %%K)")
    slurm.add_argument("--pre-cmd", default=None, metavar="CMD",
                       help="shell commands run first in each element (module "
                       "loads, environment activation)")
    slurm.add_argument("--sbatch-args", default="", metavar="ARGS",
                       help='extra raw sbatch flags, e.g. --sbatch-args="--qos=high"')
    slurm.add_argument("--requeue", action="store_true",
                       help="checkpoint and requeue elements at their time limit or "
                       "on preemption; they resume from the checkpoint")
    slurm.add_argument("--grace", type=int, default=DEFAULTS["grace"],
                       metavar="SECONDS", help="with --requeue: stop this long "
                       "before the time limit (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Plan, write and submit the array; returns the exit status."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        return submit_run(args, extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def submit_run(args: argparse.Namespace, extra: list[str]) -> int:
    """Everything main does after parsing (`extra`: flags for run_matbench.py);
    raises UserError."""
    check_run_name(args.run_name)
    if not re.fullmatch(r"([\w.-]+:)?\d+", args.gpus_per_node):
        raise UserError(f"--gpus-per-node takes a count or TYPE:COUNT (a100:1), got "
                        f"{args.gpus_per_node!r}")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+", args.time):
        raise UserError(f"--time takes SLURM's format (MINUTES, HH:MM:SS, D-HH, "
                        f"D-HH:MM:SS), got {args.time!r}")
    if args.mem and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        raise UserError(f"--mem takes a size such as 16G or 4000M (or '' for the "
                        f"cluster's default), got {args.mem!r}")
    if args.grace < 0:
        raise UserError(f"--grace must not be negative, got {args.grace}")
    if args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    if (args.max_parallel or 0) < 0:  # 0 means no limit, like leaving it out
        raise UserError(f"--max-parallel must not be negative, got {args.max_parallel}")
    out_dir = Path(args.out_dir).resolve()
    element_args = run_matbench_args(args.model, args.run_name, out_dir, extra,
                                     args.gpus_per_node, args.requeue, args.per_task)
    recipe = check_run_args(element_args, args.model, args.run_name, out_dir,
                            args.requeue, tasks=args.tasks)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else out_dir / "job-logs"

    pairs = select_pairs(args.model, args.tasks, args.folds)
    scores = scores_path(out_dir, args.run_name)
    done = done_pairs(scores, args.model)
    if args.only_missing:
        n_all = len(pairs)
        pairs = [pair for pair in pairs if pair not in done]
        if not pairs:
            print(f"nothing to submit: {scores} holds all {n_all} (task, fold) pairs")
            return 0
        print(f"{len(pairs)} of {n_all} (task, fold) pairs missing from {scores}")
    elif overlap := done.intersection(pairs):
        print(f"note: {scores} holds {len(overlap)} of these pairs already; they will "
              "be rerun and overwritten (--only-missing skips them)", file=sys.stderr)

    for task in dict.fromkeys(task for task, _ in pairs):
        check_task_recipe(args.model, task, recipe[0])
        check_same_recipe(scores, args.model, task, *recipe)
    elements = group_by_task(pairs) if args.per_task else pairs
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    script_path = log_dir / f"{args.run_name}-{stamp}.sh"
    for i in range(1, 1000):  # two submissions within a second
        if not script_path.exists():
            break
        script_path = log_dir / f"{args.run_name}-{stamp}-{i}.sh"
    sbatch_cmd = ["sbatch", "--parsable",
                  *sbatch_options(args, len(elements), log_dir), str(script_path)]
    script = job_script(elements, shell_command(element_args), shlex.join(sbatch_cmd),
                        args.pre_cmd, args.requeue)
    if args.dry_run:
        print(f"# dry run: would write {script_path} and run\n{shlex.join(sbatch_cmd)}"
              f"\n# --- {script_path.name}\n{script}", end="")
        return 0

    check_sbatch()
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    script_path.chmod(0o755)
    try:
        job_id = submit(sbatch_cmd)
    except BaseException:
        script_path.unlink()  # nothing was submitted: leave no script behind
        raise
    print(f"submitted job array {job_id}: {len(elements)} elements of {args.model} run "
          f"{args.run_name!r}\n  script: {script_path}\n  logs:   "
          f"{log_dir / f'{args.run_name}-{job_id}_<element>.log'}\n  scores: {scores}")
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
