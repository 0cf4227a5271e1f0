"""Prepare the Matbench v0.1 tasks: one featurized file per task (DATA_PATHS) holding
mbid, composition, target and, where the task's structures are available, the
Aflow-style Wyckoff (protostructure) label that Wrenformer reads.

Examples:
    python featurize_matbench.py                          # all 13 tasks
    python featurize_matbench.py --tasks matbench_phonons --workers 2
    python featurize_matbench.py --tasks matbench_phonons --force --backend moyopy

Offline, set MATBENCH_RAW_DIR to folders holding matbench_<task>.json.gz (structures)
or matbench_<task>.json.bz2 (composition tables); online, matbench downloads them.
A structure that the symmetry tool cannot label is kept, with its error in
`label_error`, and counted in the summary.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import pandas as pd

from mat_bench import ALL_TASKS, DATA_PATHS, TASK_INFO
from mat_bench.data import (
    ArgumentParser,
    UserError,
    atomic_path,
    check_task,
    load_raw_task,
)
from mat_bench.wyckoff import SYMPREC, TOOL, label_structures

WORKERS = os.cpu_count() or 1  # labelling processes


def featurize_task(task: str, backend: str = TOOL, symprec: float = SYMPREC,
                   workers: int = WORKERS) -> dict[str, object]:
    """Featurize one task and write DATA_PATHS[task] atomically; return its summary."""
    start = time.perf_counter()
    raw = load_raw_task(task)
    out = raw[["composition", "target"]].copy()
    if out.target.dtype == bool:
        out["target"] = out.target.astype(int)
    n_labelled = n_failed = 0
    if "structure" in raw:
        results = label_structures(list(raw.structure), backend, symprec, workers,
                                   desc=task)
        out["protostructure"] = [label for label, _ in results]
        out["label_error"] = [err for _, err in results]
        n_failed = sum(err is not None for _, err in results)
        n_labelled = len(results) - n_failed
    with atomic_path(DATA_PATHS[task]) as tmp:
        out.to_csv(tmp, index_label="mbid", compression="gzip")
    return {
        "task": task, "rows": len(out), "labelled": n_labelled, "failed": n_failed,
        "seconds": round(time.perf_counter() - start, 1),
        "note": ("" if "structure" in raw or TASK_INFO[task].input_type == "composition"
                 else "structures not available: no Wyckoff labels"),
    }


def featurize(tasks: Sequence[str] = ALL_TASKS, force: bool = False,
              backend: str = TOOL, symprec: float = SYMPREC,
              workers: int = WORKERS) -> pd.DataFrame:
    """Featurize the given tasks (skipping those already done unless `force`) and
    return a per-task summary table."""
    for task in tasks:
        check_task(task)
    if backend not in ("spglib", "moyopy"):
        raise UserError(f"unknown backend {backend!r}: use spglib or moyopy")
    if not symprec > 0:
        raise UserError(f"--symprec must be positive, got {symprec}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    rows = []
    for task in tasks:
        if os.path.isfile(DATA_PATHS[task]) and not force:
            rows.append({"task": task, "note": "already done (--force to redo)"})
            continue
        rows.append(featurize_task(task, backend, symprec, workers))
        print(f"wrote {DATA_PATHS[task]}", flush=True)
    summary = pd.DataFrame(rows).set_index("task")
    for col in ("rows", "labelled", "failed"):
        if col in summary:
            summary[col] = summary[col].astype("Int64")
    cols = ["rows", "labelled", "failed", "seconds", "note"]
    return summary.reindex(columns=[c for c in cols if c in summary])


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), metavar="T",
                        help="tasks to featurize (default: all 13)")
    parser.add_argument("--force", action="store_true",
                        help="redo tasks whose featurized file exists")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="processes for Wyckoff labelling (default: all cores)")
    parser.add_argument("--symprec", type=float, default=SYMPREC,
                        help="symmetry tolerance in Angstrom")
    parser.add_argument("--backend", choices=["spglib", "moyopy"], default=TOOL,
                        help="symmetry tool for the Wyckoff labels")
    args = parser.parse_args(argv)
    try:
        summary = featurize(args.tasks, args.force, args.backend, args.symprec,
                            args.workers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # tasks written are complete; none is half-written
        print("stopped by SIGINT (Ctrl-C): the tasks written so far are complete, the "
              "current one was not written; rerun to go on", file=sys.stderr)
        return 130
    print(summary.to_string(na_rep=""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
