r"""Turn one of our runs into a Matbench leaderboard submission folder.

Examples:
    python make_submission.py --run roostformer-all \
        --out-dir submissions/matbench_v0.1_Roostformer --authors "A. Author, B. Author"
    python make_submission.py --run wrenformer-phonons --scores-dir runs/model_scores \
        --preds-dir runs/model_preds --out-dir submissions/matbench_v0.1_Wrenformer

The folder holds what the matbench repository's benchmarks/ entries hold:
- results.json.gz: the run's test-fold predictions recorded through matbench's own
  MatbenchBenchmark / MatbenchTask.record (which also scores them), gzip-compressed;
  class-1 probabilities for classification tasks.
- info.json: authors, algorithm, algorithm_long, bibtex_refs, notes, requirements.
- the code that produced the predictions: this repository's scripts, at the top
  level, where matbench's submission check looks for *.py files.
Only tasks with all 5 folds can be submitted: incomplete tasks are listed on stderr
and in info.json's notes. The folder is written whole (or left as it was) and then
reloaded through matbench, which must find it valid. Rewriting a previous
submission keeps any other file the user put in the folder (and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from mat_bench import ALL_TASKS, CLASS_THRESHOLD, N_FOLDS, ROOT, TASK_INFO
from mat_bench.data import ArgumentParser, UserError, load_raw_task
from mat_bench.leaderboard import (
    DEFAULT_PREDS_DIR,
    DEFAULT_SCORES_DIR,
    MODEL_LABELS,
    Results,
    load_runs,
)

# --- defaults, in one place -------------------------------------------------------
RESULTS_NAME = "results.json.gz"
INFO_NAME = "info.json"
LEGACY_SOURCE_DIR = "source"  # where earlier versions put the scripts
SOURCE_GLOBS = ("*.py", "requirements.txt", "pyproject.toml")  # from the repo root
INFO_FIELDS = ("authors", "algorithm", "algorithm_long", "bibtex_refs", "notes",
               "requirements")  # what Matbench requires in info.json
PACKAGES = ("torch", "aviary-models", "matbench", "matminer", "pymatgen", "numpy",
            "pandas", "scikit-learn")  # versions listed under "requirements"
PLACEHOLDER_AUTHORS = "FILL IN: author names"
DESCRIPTIONS = {
    "roostformer": (
        "Roostformer: a transformer encoder over the elements of a composition "
        "(aviary's Wrenformer architecture applied to the stoichiometry only, as in "
        "Roost). Each element is a token: its matscholar embedding, combined with an "
        "encoding of its fractional amount; multi-head self-attention layers mix the "
        "tokens, which are pooled and passed to a residual output network."
    ),
    "wrenformer": (
        "Wrenformer: aviary's transformer encoder over the Wyckoff positions of a "
        "material's protostructure (Aflow-style Wyckoff label from its crystal "
        "structure): each occupied Wyckoff site is a token made of its element's "
        "matscholar embedding and its Wyckoff-position embedding; equivalent Wyckoff "
        "settings are averaged; self-attention layers, pooling, and a residual "
        "output network. Coordinate-free, as in Wren."
    ),
}
BIBTEX = r"""@article{goodall2020predicting,
  title = {Predicting materials properties without crystal structure: deep
           representation learning from stoichiometry},
  author = {Goodall, Rhys E. A. and Lee, Alpha A.},
  journal = {Nature Communications},
  volume = {11},
  number = {1},
  pages = {6280},
  year = {2020},
  doi = {10.1038/s41467-020-19964-7}
}
@article{goodall2022rapid,
  title = {Rapid discovery of stable materials by coordinate-free coarse graining},
  author = {Goodall, Rhys E. A. and Parackal, Abhijith S. and Faber, Felix A. and
            Armiento, Rickard and Lee, Alpha A.},
  journal = {Science Advances},
  volume = {8},
  number = {30},
  pages = {eabn4117},
  year = {2022},
  doi = {10.1126/sciadv.abn4117}
}"""
# run parameters that describe the machine, not the algorithm (left out of info)
MACHINE_PARAMS = ("hostname", "platform", "device", "slurm_job_id",
                  "slurm_array_job_id", "slurm_array_task_id", "fold", "task")


@contextlib.contextmanager
def quiet_matbench() -> Iterator[None]:
    """Silence matbench's INFO/WARNING chatter on stdout for the duration."""
    log = logging.getLogger("matbench")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- which tasks can be submitted -------------------------------------------------
def split_complete(run: Results) -> tuple[list[str], dict[str, list[int]]]:
    """The run's tasks with all 5 folds, and the others with the folds they have."""
    complete, incomplete = [], {}
    for task in run.tasks:
        folds = sorted(run.task_preds(task)["fold"].unique().tolist())
        if len(folds) == N_FOLDS:
            complete.append(task)
        else:
            incomplete[task] = folds
    return complete, incomplete


def describe_incomplete(run: str, incomplete: dict[str, list[int]]) -> list[str]:
    """One line per incomplete task: what it has and how to finish it."""
    lines = []
    for task, folds in incomplete.items():
        todo = [f for f in range(N_FOLDS) if f not in folds]
        lines.append(f"{task} has {len(folds)}/{N_FOLDS} folds: run folds "
                     f"{', '.join(map(str, todo))} with `python run_matbench.py "
                     f"--task {task} --fold F --run-name {run} ...` to include it")
    return lines


# --- matbench objects -------------------------------------------------------------
def matbench_frame(task: str) -> pd.DataFrame:
    """A task's data as matbench's MatbenchTask.df wants it (its input and target
    column names), from the local copy instead of a download. Only the target is
    read when recording; structure tasks without local structures carry the
    composition in the input column."""
    from matbench.metadata import mbv01_metadata

    meta = mbv01_metadata[task]
    raw = load_raw_task(task)
    inputs = raw[meta.input_type] if meta.input_type in raw else raw["composition"]
    return pd.DataFrame({meta.input_type: inputs, meta.target: raw["target"]},
                        index=raw.index)


def fold_values(run: Results, task: str, fold: int, test_ids: list[str]) -> list:
    """The run's predictions of one fold in matbench's test-id order: floats for
    regression; for classification the class-1 probabilities where matbench's own
    threshold (above CLASS_THRESHOLD) gives the run's labels, else the labels as
    bools (a run whose threshold was chosen on validation): matbench scores labels."""
    preds = run.task_preds(task)
    preds = preds[preds["fold"] == fold].set_index("mbid").reindex(test_ids)
    column = "prediction"
    if TASK_INFO[task].task_type == "classification":
        labels = preds["prediction"] > CLASS_THRESHOLD  # the recorded labels (0 or 1)
        if ((preds["probability"] > CLASS_THRESHOLD) == labels).all():
            column = "probability"
    values = preds[column]
    if values.isna().any():
        what = "class probabilities" if column == "probability" else "predictions"
        raise UserError(f"run {run.key!r} lacks {what} for {values.isna().sum()} test "
                        f"samples of {task} fold_{fold}: rerun that fold with "
                        "run_matbench.py")
    if TASK_INFO[task].task_type == "classification" and column == "prediction":
        return [bool(v) for v in labels]
    return [float(v) for v in values]


def fold_params(run: Results, task: str, fold: int) -> dict[str, Any]:
    """Hyperparameters of one fold (JSON scalars and lists only)."""
    params = run.info["scores"][task][f"fold_{fold}"].get("params", {})
    return {k: v for k, v in params.items()
            if k not in MACHINE_PARAMS and v is not None}


def build_benchmark(run: Results, tasks: list[str]) -> Any:
    """A MatbenchBenchmark with the run's predictions recorded for `tasks`."""
    from matbench.bench import MatbenchBenchmark

    with quiet_matbench():
        bench = MatbenchBenchmark(autoload=False, subset=tasks)
        for task in bench.tasks:
            task.df = matbench_frame(task.dataset_name)
            for fold in task.folds:
                test_ids = list(task.validation[task.folds_map[fold]].test)
                try:
                    task.record(fold, fold_values(run, task.dataset_name, fold,
                                                  test_ids),
                                params=fold_params(run, task.dataset_name, fold))
                except (ValueError, TypeError) as exc:
                    raise UserError(f"matbench refused {task.dataset_name} fold_{fold}"
                                    f" of run {run.key!r}: {exc}") from exc
        bench.add_metadata({"run_name": run.key,
                            "model": str(run.info.get("model", "unknown"))})
    return bench


def load_submission(folder: str | os.PathLike) -> Any:
    """Reload a submission's results.json.gz through matbench (which checks its hash
    and every task) and return the MatbenchBenchmark; UserError if matbench finds it
    invalid."""
    from matbench.bench import MatbenchBenchmark

    path = Path(folder) / RESULTS_NAME
    try:
        with quiet_matbench(), gzip.open(path, "rt") as file:
            bench = MatbenchBenchmark.from_dict(json.load(file))
            errors = bench.validate()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid matbench results file: {exc}") from exc
    if errors:
        task, trace = next(iter(errors.items()))
        raise UserError(f"matbench finds {path} invalid for {task}: "
                        f"{trace.strip().splitlines()[-1]}")
    return bench


# --- info.json and source ---------------------------------------------------------
def requirements() -> str:
    """Python and the versions of the packages the run used."""
    versions = [f"python=={platform.python_version()}"]
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name}=={metadata.version(name)}")
    return ", ".join(versions)


def make_info(run: Results, tasks: list[str], incomplete: dict[str, list[int]],
              authors: str, algorithm: str | None, notes: str) -> dict[str, str]:
    """info.json's content: the fields Matbench requires."""
    model = str(run.info.get("model", "unknown"))
    params = fold_params(run, tasks[0], 0)
    hyper = ", ".join(f"{k}={v}" for k, v in params.items()
                      if k not in ("model", "run_name", "n_params", "torch_version",
                                   "git_commit"))
    long = (f"{DESCRIPTIONS.get(model, model)} Trained from scratch on each training "
            f"fold (the final epoch's model is tested; no test data used for model "
            f"selection). Hyperparameters: {hyper}.")
    run_notes = [f"Run {run.key!r}; tasks: {', '.join(tasks)}."]
    if params.get("git_commit"):
        run_notes.append(f"Code at commit {params['git_commit']}.")
    if incomplete:
        run_notes.append("Not submitted (incomplete): " + "; ".join(
            f"{t} ({len(f)}/{N_FOLDS} folds)" for t, f in incomplete.items()) + ".")
    if notes:
        run_notes.append(notes)
    return {
        "authors": authors,
        "algorithm": algorithm or MODEL_LABELS.get(model, model),
        "algorithm_long": long,
        "bibtex_refs": BIBTEX,
        "notes": " ".join(run_notes),
        "requirements": requirements(),
    }


def copy_source(dest: Path) -> list[str]:
    """Copy this repository's scripts (the code behind the predictions) to dest."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted({p.name for pattern in SOURCE_GLOBS
                    for p in Path(ROOT).glob(pattern) if p.is_file()})
    for name in names:
        shutil.copy2(Path(ROOT) / name, dest / name)
    return names


def replace_folder(new: Path, out_dir: Path, ours: set[str]) -> list[str]:
    """Move a finished folder onto out_dir, replacing a previous submission: files
    of ours (named in `ours`) are replaced, anything else in the old folder moves
    into the new one. Returns the names kept."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return []
    kept = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    for name in kept:
        os.replace(out_dir / name, new / name)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return kept


# --- the script -------------------------------------------------------------------
def make_submission(
    run: str,
    out_dir: str | os.PathLike,
    scores_dir: str | os.PathLike = DEFAULT_SCORES_DIR,
    preds_dir: str | os.PathLike = DEFAULT_PREDS_DIR,
    authors: str | None = None,
    algorithm: str | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """Write the submission folder for `run` and return {"tasks": submitted tasks,
    "incomplete": {task: folds present}, "folder": path, "warnings": lines}."""
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not
                             (out_dir / INFO_NAME).is_file()):
        raise UserError(f"{out_dir} exists and is not a submission folder: choose a "
                        "new --out-dir")
    (results,) = load_runs(scores_dir, preds_dir, [run])
    tasks, incomplete = split_complete(results)
    warnings = describe_incomplete(run, incomplete)
    if not tasks:
        raise UserError(f"run {run!r} has no task with all {N_FOLDS} folds, so there "
                        f"is nothing to submit: {'; '.join(warnings)}")
    if not authors:
        authors = PLACEHOLDER_AUTHORS
        warnings.append(f"no --authors given: edit 'authors' in {out_dir / INFO_NAME}"
                        " before submitting")
    bench = build_benchmark(results, tasks)
    info = make_info(results, tasks, incomplete, authors, algorithm, notes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private
    try:
        with quiet_matbench(), gzip.open(tmp / RESULTS_NAME, "wt") as file:
            json.dump(bench.as_dict(), file)
        with open(tmp / INFO_NAME, "w") as file:
            json.dump(info, file, indent=4)
            file.write("\n")
        sources = copy_source(tmp)
        load_submission(tmp)  # matbench must accept it before it replaces anything
        ours = {RESULTS_NAME, INFO_NAME, LEGACY_SOURCE_DIR, *sources}
        kept = replace_folder(tmp, out_dir, ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if kept:
        warnings.append(f"kept your other files in {out_dir}: {', '.join(kept)}")
    return {"tasks": tasks, "incomplete": incomplete, "folder": out_dir,
            "warnings": warnings}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run name (file stem in "
                        "model_scores/ and model_preds/)")
    parser.add_argument("--scores-dir", default=DEFAULT_SCORES_DIR,
                        help="default: model_scores/")
    parser.add_argument("--preds-dir", default=DEFAULT_PREDS_DIR,
                        help="default: model_preds/")
    parser.add_argument("--out-dir", required=True, help="the submission folder, "
                        "e.g. submissions/matbench_v0.1_Roostformer")
    parser.add_argument("--authors", default=None, help="info.json authors "
                        f"(default: {PLACEHOLDER_AUTHORS!r}, to edit before "
                        "submitting)")
    parser.add_argument("--algorithm", default=None,
                        help="info.json algorithm (default: Roostformer/Wrenformer)")
    parser.add_argument("--notes", default="", help="extra text for info.json notes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = make_submission(args.run, args.out_dir, args.scores_dir,
                              args.preds_dir, args.authors, args.algorithm,
                              args.notes)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in out["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    order = [t for t in ALL_TASKS if t in out["tasks"]]
    print(f"wrote {out['folder']}: {len(order)} task(s) recorded and validated by "
          f"matbench: {', '.join(order)}")
    if out["incomplete"]:
        print(f"not included (incomplete): {', '.join(out['incomplete'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
