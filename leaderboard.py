"""Load and score test-fold predictions: our runs (model_scores/ and model_preds/,
written by run_matbench.py) and the published Matbench leaderboard entries (a clone
of the matbench repository's benchmarks/ folder). Every model is scored by the same
code from its recorded predictions against the same targets on Matbench's own
folds, so our rows and the published ones compare like for like.

    from mat_bench.leaderboard import load_leaderboard, load_runs, score_results
    ours = load_runs("model_scores", "model_preds")
    published = load_leaderboard()  # the folder in $MATBENCH_BENCHMARKS_DIR
    fold_scores = score_results(ours + published)  # one row per model, task, fold
    per_task = task_scores(fold_scores)  # mean over folds and the scaled error
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, r2_score, roc_auc_score

from mat_bench import ALL_TASKS, CLASS_THRESHOLD, N_FOLDS, ROOT, TASK_INFO
from mat_bench.data import (
    UserError,
    atomic_path,
    get_fold_ids,
    load_raw_task,
    open_maybe_gzip,
    read_json_results,
    read_run_preds,
    scores_file,
)

# --- defaults, in one place -------------------------------------------------------
DEFAULT_SCORES_DIR = os.path.join(ROOT, "model_scores")
DEFAULT_PREDS_DIR = os.path.join(ROOT, "model_preds")
BENCHMARKS_ENV = "MATBENCH_BENCHMARKS_DIR"
RESULTS_FILE = "results.json.gz"  # inside each benchmarks/matbench_v0.1_<algo>/
# values of the `source` column: our runs, published entries scored from their
# prediction files, and published entries known by their scores only
OURS, MATBENCH, SCORES_ONLY = "ours", "matbench", "scores only"
LEADERBOARD_SCORES_ENV = "MATBENCH_LEADERBOARD_SCORES"
LEADERBOARD_SCORES_FILE = "leaderboard_scores.csv"  # default: beside benchmarks/
SCORES_ONLY_MARK = " (scores only)"  # appended to the names of such entries
# entries that read compositions only on structure tasks (on composition tasks every
# entry does): the fair neighbours of Roostformer (the Dummy baseline reads nothing)
COMPOSITION_ONLY = ("CrabNet", "Finder_v1.2 composition-only version")
MODEL_LABELS = {"roostformer": "Roostformer", "wrenformer": "Wrenformer"}
# one row per test sample; probability is NaN where a model recorded labels only
PRED_COLUMNS = ["task", "fold", "mbid", "target", "prediction", "probability"]
REG_METRICS = ("mae", "rmse", "r2")
CLF_METRICS = ("rocauc", "rocauc_prob", "accuracy", "f1")
SCORE_COLUMNS = [*REG_METRICS, *CLF_METRICS, "scaled_error"]
# one row per model, task and fold
FOLD_COLUMNS = ["name", "source", "key", "task", "fold", "n_test", *SCORE_COLUMNS]
# bump when the scoring changes so that cached leaderboard scores are recomputed
SCORING_VERSION = 2


@dataclass
class Results:
    """One model's test-fold predictions: one of our runs or a leaderboard entry."""

    name: str  # label in figures and tables, unique among loaded results
    source: str  # OURS or MATBENCH
    key: str  # run name, or the benchmark folder name
    preds: pd.DataFrame  # PRED_COLUMNS
    info: dict[str, Any] = field(default_factory=dict)  # run params or info.json

    @property
    def tasks(self) -> list[str]:
        """Tasks with at least one fold, in Matbench order."""
        present = set(self.preds["task"])
        return [task for task in ALL_TASKS if task in present]

    def task_preds(self, task: str) -> pd.DataFrame:
        """This model's predictions for one task (all its folds)."""
        return self.preds[self.preds["task"] == task]


# --- targets and scores -----------------------------------------------------------
@cache
def task_targets(task: str) -> pd.Series:
    """The target of every sample of a task, indexed by mbid."""
    return load_raw_task(task)["target"]


def mad(task: str) -> float:
    """Mean absolute deviation of a regression task's target, from matbench's
    metadata (the MAE of always predicting the mean)."""
    from matbench.metadata import mbv01_metadata

    return float(mbv01_metadata[task]["mad"])


def task_metric(task: str) -> str:
    """The metric Matbench ranks a task by: mae (regression) or rocauc."""
    return TASK_INFO[task].metric


def scaled_error(task: str, scores: dict[str, float]) -> float:
    """MAE / MAD for regression, (1 - ROC-AUC) / 0.5 for classification: 0 is
    perfect, 1 is no better than the mean or a coin flip."""
    if TASK_INFO[task].task_type == "regression":
        return scores["mae"] / mad(task)
    return (1 - scores["rocauc"]) / 0.5


def score_fold(task: str, fold_preds: pd.DataFrame) -> dict[str, float]:
    """Metrics of one task's fold, plus the scaled error.

    Regression: MAE, RMSE, R^2. Classification, as matbench 0.6 scores a recorded
    fold (and so as the published leaderboard shows it): accuracy, F1 and rocauc
    from the class labels in `prediction` (a published entry's probabilities
    thresholded as matbench does, above CLASS_THRESHOLD; our runs' labels, at the
    threshold the run chose on validation or CLASS_THRESHOLD); and rocauc_prob,
    the ROC-AUC of the class-1 probabilities where a model recorded them (NaN
    otherwise)."""
    target = fold_preds["target"].to_numpy()
    pred = fold_preds["prediction"].to_numpy(dtype=float)
    if TASK_INFO[task].task_type == "regression":
        target = target.astype(float)
        scores = {
            "mae": float(np.mean(np.abs(pred - target))),
            "rmse": float(np.sqrt(np.mean((pred - target) ** 2))),
            "r2": float(r2_score(target, pred)),
        }
    else:
        truth = target.astype(bool)
        prob = fold_preds["probability"].to_numpy(dtype=float)
        has_prob = not np.isnan(prob).any()
        labels = pred > CLASS_THRESHOLD  # the recorded class labels, as matbench reads
        scores = {
            "rocauc": float(roc_auc_score(truth, labels)),
            "rocauc_prob": float(roc_auc_score(truth, prob)) if has_prob else np.nan,
            "accuracy": float(accuracy_score(truth, labels)),
            "f1": float(f1_score(truth, labels)),
        }
    scores["scaled_error"] = scaled_error(task, scores)
    return scores


def score_results(results: list[Results]) -> pd.DataFrame:
    """Score every fold of every model: one row per (name, task, fold) with source,
    key, n_test, the task's metrics (others NaN) and scaled_error."""
    rows = []
    for res in results:
        for (task, fold), group in res.preds.groupby(["task", "fold"], sort=False):
            rows.append({"name": res.name, "source": res.source, "key": res.key,
                         "task": task, "fold": int(fold), "n_test": len(group),
                         **score_fold(task, group)})
    return pd.DataFrame(rows).reindex(columns=FOLD_COLUMNS)


def task_scores(fold_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds per (name, task): n_folds, partial (fewer than 5 folds),
    <metric> and <metric>_std for every metric, and scaled_error."""
    metrics = [*REG_METRICS, *CLF_METRICS]
    grouped = fold_scores.groupby(["name", "task"], sort=False)
    out = grouped.agg(source=("source", "first"), key=("key", "first"),
                      n_folds=("fold", "nunique"), n_test=("n_test", "sum"))
    out = out.join(grouped[metrics].mean()).join(grouped[metrics].std(ddof=0)
                                                 .add_suffix("_std"))
    out["scaled_error"] = grouped["scaled_error"].mean()
    out["partial"] = out["n_folds"] < N_FOLDS
    return out.reset_index()


def rank_table(per_task: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard per task: models ranked by scaled error (1 is best), with
    the task's metric as mean and spread over folds (and, for classification,
    the ROC-AUC of the probabilities where recorded). Partial models are ranked
    too and flagged by their fold count."""
    tasks = tasks or [t for t in ALL_TASKS if t in set(per_task["task"])]
    rows = []
    for task in tasks:
        metric = task_metric(task)
        sub = per_task[per_task["task"] == task].sort_values("scaled_error")
        for rank, row in enumerate(sub.itertuples(), start=1):
            rows.append({
                "task": task, "rank": rank, "model": row.name,
                "source": row.source, "folds": f"{row.n_folds}/{N_FOLDS}",
                "metric": metric, "mean": getattr(row, metric),
                "std": getattr(row, f"{metric}_std"),
                "scaled_error": row.scaled_error, "rocauc_prob": row.rocauc_prob,
            })
    return pd.DataFrame(rows, columns=["task", "rank", "model", "source", "folds",
                                       "metric", "mean", "std", "scaled_error",
                                       "rocauc_prob"])


# --- our runs ---------------------------------------------------------------------
def list_runs(scores_dir: str | os.PathLike) -> list[str]:
    """Run names (file stems) in a model_scores folder; UserError when it has none."""
    folder = Path(scores_dir)
    runs = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if not runs:
        raise UserError(
            f"no run scores (*.json) in {folder}: run `python run_matbench.py "
            "--model roostformer --task matbench_steels --fold 0` first, or pass "
            "--scores-dir"
        )
    return runs


@cache
def _test_ids(task: str, fold: int) -> frozenset[str]:
    """Matbench's test ids of one fold."""
    return frozenset(get_fold_ids(task, fold)[1])


def _check_test_ids(what: str, task: str, fold: int, mbids: list[str]) -> None:
    """UserError unless `mbids` are exactly Matbench's test ids of that fold."""
    expected = _test_ids(task, fold)
    if len(mbids) != len(expected) or not expected.issuperset(mbids):
        raise UserError(
            f"{what} {task} fold_{fold} holds {len(mbids)} predictions that are not "
            f"Matbench's {len(expected)} test ids of that fold: regenerate it"
        )


def read_run(run: str, scores_dir: str | os.PathLike,
             preds_dir: str | os.PathLike) -> Results:
    """One of our runs: the folds listed in model_scores/<run>.json with their
    predictions from model_preds/<run>/ (UserError where those are missing)."""
    scores_path = scores_file(scores_dir, run)
    preds_path = Path(preds_dir) / run
    scores = read_json_results(scores_path)
    if not scores:
        available = ", ".join(list_runs(scores_dir))
        raise UserError(f"run {run!r} has no scores in {scores_path}: choose one of "
                        f"{available}")
    all_preds = read_run_preds(preds_dir, run)
    frames, params = [], {}
    for task, folds in scores.items():
        if task not in TASK_INFO:
            raise UserError(f"{scores_path} has an unknown task {task!r}: repair or "
                            "move that file")
        for fold_key, entry in sorted(folds.items()):
            fold = int(fold_key.removeprefix("fold_"))
            pred = all_preds.get(task, {}).get(fold_key)
            if not pred:
                raise UserError(
                    f"run {run!r} has scores for {task} {fold_key} but no predictions "
                    f"in {preds_path}: rerun that fold with `python run_matbench.py "
                    f"--task {task} --fold {fold} --run-name {run} ...` or pass the "
                    "matching --preds-dir"
                )
            _check_test_ids(f"predictions of run {run!r} for", task, fold,
                            pred["mbid"])
            values = pd.to_numeric(pd.Series(pred.get("prediction", [])),
                                   errors="coerce")
            if len(values) != len(pred["mbid"]) or not np.isfinite(values).all():
                raise UserError(
                    f"run {run!r} has missing or non-finite predictions for {task} "
                    f"{fold_key} in {preds_path}: rerun that fold with `python "
                    f"run_matbench.py --task {task} --fold {fold} --run-name {run} ...`"
                )
            probability = pred.get("probability") or [np.nan] * len(pred["mbid"])
            frames.append(pd.DataFrame({
                "task": task, "fold": fold, "mbid": pred["mbid"],
                "target": pred["target"], "prediction": pred["prediction"],
                "probability": [np.nan if p is None else p for p in probability],
            }))
            params = params or dict(entry.get("params", {}))
    model = str(params.get("model", "unknown model"))
    name = f"{MODEL_LABELS.get(model, model)} ({run})"
    preds = pd.concat(frames, ignore_index=True).astype(
        {"prediction": float, "probability": float})
    return Results(name=name, source=OURS, key=run, preds=preds,
                   info={"scores": scores, **params})


def load_runs(scores_dir: str | os.PathLike = DEFAULT_SCORES_DIR,
              preds_dir: str | os.PathLike = DEFAULT_PREDS_DIR,
              runs: list[str] | None = None) -> list[Results]:
    """Our runs (all in scores_dir unless `runs` names some), each with the folds
    it has (partial runs included)."""
    available = list_runs(scores_dir)
    for run in runs or []:
        if run not in available:
            raise UserError(f"no run {run!r} in {scores_dir}: choose from "
                            f"{', '.join(available)}")
    return [read_run(run, scores_dir, preds_dir) for run in runs or available]


# --- the published leaderboard ----------------------------------------------------
def leaderboard_scores_path(benchmarks: Path, path: str | os.PathLike | None = None
                            ) -> Path | None:
    """The whole published leaderboard's scores (a CSV of task, algorithm,
    benchmark_folder, metric, mean, std): `path`, else $MATBENCH_LEADERBOARD_SCORES,
    else leaderboard_scores.csv beside the benchmarks folder; None if there is none
    (only `path` or the variable must exist)."""
    given = path or os.environ.get(LEADERBOARD_SCORES_ENV)
    if given:
        if not Path(given).is_file():
            raise UserError(f"leaderboard scores {given} not found: pass "
                            f"--leaderboard-scores or set {LEADERBOARD_SCORES_ENV} "
                            f"to a {LEADERBOARD_SCORES_FILE}")
        return Path(given)
    beside = benchmarks.parent / LEADERBOARD_SCORES_FILE
    return beside if beside.is_file() else None


def scores_only_entries(path: Path, loaded_keys: set[str],
                        tasks: list[str] | None = None) -> pd.DataFrame:
    """Rows in task_scores' layout for the published entries of the scores CSV whose
    predictions are not among `loaded_keys` (benchmark folder names): 5 folds,
    the leaderboard's mean and std of the task's metric, and the scaled error
    from that mean. Their names end in SCORES_ONLY_MARK."""
    try:
        csv = pd.read_csv(path)
        csv = csv[["task", "algorithm", "benchmark_folder", "metric", "mean", "std"]]
    except Exception as exc:
        raise UserError(f"leaderboard scores {path} are unreadable "
                        f"({type(exc).__name__}: {exc}): expected the columns task, "
                        "algorithm, benchmark_folder, metric, mean, std") from exc
    rows = []
    for row in csv.itertuples():
        if row.task not in TASK_INFO or (tasks and row.task not in tasks):
            continue
        if row.benchmark_folder in loaded_keys or row.metric != task_metric(row.task):
            continue
        rows.append({"name": row.algorithm + SCORES_ONLY_MARK, "task": row.task,
                     "source": SCORES_ONLY, "key": row.benchmark_folder,
                     "n_folds": N_FOLDS, "n_test": np.nan, row.metric: row.mean,
                     f"{row.metric}_std": row.std,
                     "scaled_error": scaled_error(row.task, {row.metric: row.mean}),
                     "partial": False})
    return pd.DataFrame(rows)


def is_composition_only(name: str, task: str) -> bool:
    """Whether a published entry reads compositions only on this task (the Dummy
    baseline, which reads nothing, does not count)."""
    base = name.removesuffix(SCORES_ONLY_MARK)
    if base == "Dummy":
        return False
    return TASK_INFO[task].input_type == "composition" or base in COMPOSITION_ONLY



def benchmarks_dir(path: str | os.PathLike | None) -> Path:
    """The leaderboard folder: `path` if given, else $MATBENCH_BENCHMARKS_DIR; it
    must hold at least one <entry>/results.json.gz."""
    path = path or os.environ.get(BENCHMARKS_ENV)
    if not path:
        raise UserError(
            f"no Matbench leaderboard given: pass --benchmarks-dir or set "
            f"{BENCHMARKS_ENV} to a clone of the matbench repository's benchmarks/ "
            "folder"
        )
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"benchmarks folder {folder} does not exist: pass "
                        f"--benchmarks-dir or set {BENCHMARKS_ENV} to matbench's "
                        "benchmarks/ folder")
    if not list_entries(folder):
        raise UserError(f"benchmarks folder {folder} holds no */{RESULTS_FILE}: point "
                        "it at matbench's benchmarks/ folder")
    return folder


def list_entries(folder: str | os.PathLike) -> list[Path]:
    """Leaderboard entry folders (those holding a results file), sorted by name."""
    return sorted(p.parent for p in Path(folder).glob(f"*/{RESULTS_FILE}"))


def read_entry_info(entry: Path) -> dict[str, Any]:
    """An entry's info.json (empty where missing)."""
    path = entry / "info.json"
    if not path.is_file():
        return {}
    with open(path) as file:
        return json.load(file)


def entry_name(entry: Path) -> str:
    """An entry's label: the algorithm in its info.json, else the folder name."""
    name = read_entry_info(entry).get("algorithm")
    return str(name) if name else entry.name.removeprefix("matbench_v0.1_")


def entry_names(entries: list[Path]) -> dict[Path, str]:
    """Labels of entries, made unique with the folder name where two clash."""
    names = {entry: entry_name(entry) for entry in entries}
    counts = pd.Series(list(names.values())).value_counts()
    return {entry: f"{name} [{entry.name}]" if counts[name] > 1 else name
            for entry, name in names.items()}


def read_entry(entry: Path, tasks: list[str] | None = None,
               name: str | None = None) -> Results:
    """One published entry's recorded test-fold predictions, for `tasks` (all its
    tasks by default), labelled `name` (default: entry_name). Files that matbench
    0.6 wrote as plain JSON are read too."""
    try:
        with open_maybe_gzip(entry / RESULTS_FILE) as file:
            data = json.load(file)
        recorded = data["tasks"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise UserError(f"{entry / RESULTS_FILE} is not a readable matbench results "
                        f"file ({type(exc).__name__}): replace it") from exc
    frames = []
    for task, task_data in recorded.items():
        if task not in TASK_INFO or (tasks is not None and task not in tasks):
            continue
        targets = task_targets(task)
        for fold_key, fold_data in task_data["results"].items():
            fold = int(fold_key.removeprefix("fold_"))
            ids, values = list(fold_data["data"]), list(fold_data["data"].values())
            _check_test_ids(f"leaderboard entry {entry.name}:", task, fold, ids)
            frame = pd.DataFrame({"task": task, "fold": fold, "mbid": ids,
                                  "target": targets.loc[ids].to_numpy()})
            if TASK_INFO[task].task_type == "classification" and any(
                    isinstance(v, float) for v in values):  # probabilities
                frame["probability"] = np.asarray(values, dtype=float)
                frame["prediction"] = (frame["probability"] > CLASS_THRESHOLD
                                       ).astype(float)
            else:  # regression values, or class labels (bools)
                frame["prediction"] = np.asarray(values, dtype=float)
                frame["probability"] = np.nan
            frames.append(frame[PRED_COLUMNS])
    preds = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=PRED_COLUMNS))
    return Results(name=name or entry_name(entry), source=MATBENCH, key=entry.name,
                   preds=preds, info=read_entry_info(entry))


def load_leaderboard(folder: str | os.PathLike | None = None,
                     tasks: list[str] | None = None,
                     entries: list[str] | None = None) -> list[Results]:
    """Published entries with their predictions for `tasks` (all by default);
    `entries` restricts to those folder names or algorithm names."""
    names = entry_names(list_entries(benchmarks_dir(folder)))
    if entries is not None:
        names = {e: n for e, n in names.items() if e.name in entries or n in entries}
    loaded = [read_entry(entry, tasks, name) for entry, name in names.items()]
    return [res for res in loaded if len(res.preds)]


def _fingerprint(entry: Path) -> list[Any]:
    """Changes whenever an entry's results file or the scoring code changes."""
    stat = (entry / RESULTS_FILE).stat()
    return [SCORING_VERSION, stat.st_size, stat.st_mtime_ns]


def leaderboard_fold_scores(folder: str | os.PathLike | None = None,
                            tasks: list[str] | None = None,
                            cache_path: str | os.PathLike | None = None
                            ) -> pd.DataFrame:
    """score_results() of every published entry on `tasks` (all by default). With
    cache_path, the scores are kept in that JSON file: an entry is read and scored
    again only for tasks not cached yet or when its results file changed."""
    folder = benchmarks_dir(folder)
    tasks = list(tasks or ALL_TASKS)
    try:
        cache = read_json_results(cache_path) if cache_path else {}
    except UserError:  # a damaged cache is rebuilt
        cache = {}
    frames, changed = [], False
    for entry, name in entry_names(list_entries(folder)).items():
        hit = cache.get(entry.name, {})
        if hit.get("fingerprint") != _fingerprint(entry):
            hit = cache[entry.name] = {"fingerprint": _fingerprint(entry), "tasks": {}}
        missing = [task for task in tasks if task not in hit["tasks"]]
        if missing:
            scores = score_results([read_entry(entry, missing, name)])
            for task in missing:  # an empty list: the entry does not have this task
                rows = scores[scores["task"] == task]
                hit["tasks"][task] = json.loads(rows.to_json(orient="records"))
            changed = True
        frames += [pd.DataFrame(hit["tasks"][task], columns=FOLD_COLUMNS).astype(
            dict.fromkeys(SCORE_COLUMNS, float)).assign(name=name)
            for task in tasks if hit["tasks"][task]]
    if cache_path and changed:
        with atomic_path(cache_path) as tmp, open(tmp, "w") as file:
            json.dump(cache, file)
    if not frames:
        return pd.DataFrame(columns=FOLD_COLUMNS)
    return pd.concat(frames, ignore_index=True)
