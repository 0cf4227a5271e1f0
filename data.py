"""Shared data helpers: Matbench raw data (offline or online), featurized data sets,
Matbench's own folds, and the JSON result files that many jobs merge into at once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
from filelock import FileLock

from mat_bench import ALL_TASKS, DATA_PATHS, N_FOLDS, TASK_INFO

RAW_DIR_ENV = "MATBENCH_RAW_DIR"
DOWNLOAD_TIMEOUT_S = 60  # per socket operation of a download: no network never hangs


class UserError(Exception):
    """An error the user can fix; scripts print its one-line message and exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring's examples as written, and each
    flag's default (unless it is None, or False for a plain switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = any(action.default is value for value in (None, False,
                                                           argparse.SUPPRESS))
        shown = not hidden or isinstance(action, argparse.BooleanOptionalAction)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' command lines: HelpFormatter's --help, and a mistake answered in
    one line (argparse's reason and where to read the flags), not the whole usage."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `python {self.prog} "
                     "--help`)\n")


# --- checks -----------------------------------------------------------------------
def check_task(task: str) -> None:
    """Raise UserError for a name that is not one of the 13 Matbench v0.1 tasks."""
    if task not in TASK_INFO:
        raise UserError(
            f"unknown task {task!r}: choose one of {', '.join(ALL_TASKS)}"
        )


def check_fold(fold: int) -> None:
    """Raise UserError for a fold outside 0..4."""
    if not 0 <= fold < N_FOLDS:
        raise UserError(f"fold {fold} is out of range: Matbench folds are 0 to 4")


# --- atomic files -----------------------------------------------------------------
@contextlib.contextmanager
def temp_beside(path: str | os.PathLike) -> Iterator[str]:
    """Yield a new temporary file's path in `path`'s folder (made if missing), with
    the permissions of a normal file; it is removed at the end unless moved away."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are shared files
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` and move it onto `path` only if the
    block finishes: a killed or failed writer never leaves a half-written file."""
    with temp_beside(path) as tmp:
        yield tmp
        os.replace(tmp, path)


# --- raw Matbench data ------------------------------------------------------------
def raw_data_dirs() -> list[Path]:
    """Folders listed in $MATBENCH_RAW_DIR (colon-separated), searched before any
    download; UserError for one that is not a folder (a typo would otherwise end
    in a failed download)."""
    folders = [Path(p) for p in os.environ.get(RAW_DIR_ENV, "").split(":") if p]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{RAW_DIR_ENV} names {folder}, which is not a folder: fix "
                            f"{RAW_DIR_ENV} (a colon-separated list of folders)")
    return folders


def find_raw_file(task: str) -> Path | None:
    """The local copy of a task: matminer's download `<task>.json.gz` (with
    structures) in any raw dir wins over a composition table `<task>.json.bz2`."""
    for suffix in (".json.gz", ".json.bz2"):
        for folder in raw_data_dirs():
            if (path := folder / f"{task}{suffix}").is_file():
                return path
    return None


def mbids(task: str, n_rows: int) -> list[str]:
    """Matbench ids in data set order, as matbench builds them: mb-phonons-0001, ..."""
    n_digits = math.floor(math.log(n_rows, 10)) + 1
    prefix = task.replace("matbench", "mb").replace("_", "-")
    return [f"{prefix}-{idx + 1:0{n_digits}d}" for idx in range(n_rows)]


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened inside the block (matminer's download, which sets no
    timeout of its own) a timeout, so that a network that drops packets fails
    instead of hanging."""
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_raw_task(task: str) -> pd.DataFrame:
    """Load a Matbench task as a DataFrame indexed by mbid with columns `composition`
    (formula string), `target` and, where the structures are available, `structure`
    (pymatgen Structures). Local files in $MATBENCH_RAW_DIR come first; otherwise
    matbench downloads the data set through matminer."""
    check_task(task)
    target_col, _, input_type = TASK_INFO[task]
    path = find_raw_file(task)
    try:
        if path is not None and path.name.endswith(".json.bz2"):
            df = pd.read_json(path).set_index("mbid")
        elif path is not None:
            from matminer.utils.io import load_dataframe_from_json

            df = load_dataframe_from_json(str(path), pbar=False)
            df.index = mbids(task, len(df))
        else:
            from matbench.data_ops import load

            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                df = load(task)
    except UserError:
        raise
    except Exception as exc:  # corrupt file or failed download
        where = path or "the matminer download"
        hint = (
            f"check or replace {path}"
            if path
            else f"set {RAW_DIR_ENV} to a folder holding {task}.json.gz or "
            f"{task}.json.bz2 (no network here?)"
        )
        raise UserError(
            f"could not load {task} from {where} ({type(exc).__name__}: "
            f"{str(exc)[:200]}): {hint}"
        ) from exc
    df.index.name = "mbid"
    if target_col not in df:
        raise UserError(f"{path or task} has no target column {target_col!r}")
    out = pd.DataFrame(index=df.index)
    if input_type == "structure" and "structure" in df:
        out["composition"] = [struct.composition.formula for struct in df.structure]
        out["structure"] = df.structure
    else:
        out["composition"] = df["composition"].astype(str)
    out["target"] = df[target_col]
    return out


# --- featurized data sets ---------------------------------------------------------
def load_featurized(task: str) -> pd.DataFrame:
    """Read a task's featurized file (written by featurize_matbench.py), indexed by
    mbid, with columns composition, target and, for structure tasks whose structures
    were available, protostructure (Aflow-style Wyckoff label) and label_error."""
    check_task(task)
    path = DATA_PATHS[task]
    if not os.path.isfile(path):
        raise UserError(
            f"featurized data for {task} not found at {path}: run "
            f"`python featurize_matbench.py --tasks {task}` first"
        )
    try:
        return pd.read_csv(path, index_col="mbid", keep_default_na=False,
                           na_values={"protostructure": [""], "label_error": [""]})
    except Exception as exc:
        raise UserError(
            f"featurized file {path} is unreadable ({type(exc).__name__}): "
            f"rebuild it with `python featurize_matbench.py --tasks {task} --force`"
        ) from exc


# --- Matbench folds ---------------------------------------------------------------
def get_fold_ids(task: str, fold: int) -> tuple[list[str], list[str]]:
    """Matbench v0.1's own (train+val ids, test ids) for one task and fold, from the
    validation splits that ship inside the matbench package (read directly: importing
    matbench pulls in matminer and takes seconds)."""
    check_task(task)
    check_fold(fold)
    splits = _matbench_splits()[task][f"fold_{fold}"]
    return list(splits["train"]), list(splits["test"])


@functools.cache
def _matbench_splits() -> dict[str, Any]:
    spec = importlib.util.find_spec("matbench")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("matbench is not installed: pip install --no-deps "
                        "matbench==0.6")
    path = Path(spec.submodule_search_locations[0]) / "matbench_v0.1_validation.json"
    with open(path) as file:
        return json.load(file)["splits"]


# --- result files -----------------------------------------------------------------
def scores_file(scores_dir: str | os.PathLike, run: str) -> Path:
    """Where a run's scores live: SCORES_DIR/RUN.json, every task and fold in one
    small file."""
    return Path(scores_dir) / f"{run}.json"


def preds_file(preds_dir: str | os.PathLike, run: str, task: str) -> Path:
    """Where a run's test predictions on a task live: PREDS_DIR/RUN/TASK.json.gz,
    one gzipped file per task, so that the large tasks' megabytes of predictions
    are written (and committed) only when that task's folds change."""
    return Path(preds_dir) / run / f"{task}.json.gz"


def read_run_preds(preds_dir: str | os.PathLike, run: str) -> dict[str, Any]:
    """A run's predictions (task -> fold_k -> entry) from its per-task files, over
    a single PREDS_DIR/RUN.json as versions before 2026-11 wrote them."""
    preds = read_json_results(Path(preds_dir) / f"{run}.json")
    for path in sorted((Path(preds_dir) / run).glob("*.json.gz")):
        preds.update(read_json_results(path))
    return preds


def write_json(path: str | os.PathLike, data: Any, compact: bool = False,
               gz: bool | None = None) -> None:
    """Write JSON, gzip-compressed if `gz` (default: where the name ends in .gz)
    with no name or timestamp in the header, so that equal content gives equal
    bytes."""
    text = (json.dumps(data, separators=(",", ":")) if compact
            else json.dumps(data, indent=1)) + "\n"
    if str(path).endswith(".gz") if gz is None else gz:
        with open(path, "wb") as raw, gzip.GzipFile(
                filename="", fileobj=raw, mode="wb", mtime=0) as file:
            file.write(text.encode())
    else:
        with open(path, "w") as file:
            file.write(text)


def read_json_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file (plain or gzipped JSON); an absent file is empty. Invalid
    JSON raises UserError so that nobody overwrites a file they could not read."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with open_maybe_gzip(path) as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc}); refusing to touch it: repair or move "
            "it"
        ) from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: repair or move it")
    for task, folds in data.items():  # task -> fold_k -> entry
        if not isinstance(folds, dict) or not all(
                re.fullmatch(r"fold_\d+", str(key)) and isinstance(entry, dict)
                for key, entry in folds.items()):
            raise UserError(
                f"{path} is not a results file (its {task!r} should map fold_0 .. "
                "fold_4 to entries): refusing to touch it, repair or move it"
            )
        if task in TASK_INFO and TASK_INFO[task].task_type == "classification":
            for entry in folds.values():
                upgrade_legacy_rocauc(entry)
    return data


def upgrade_legacy_rocauc(entry: dict[str, Any]) -> None:
    """Rename, in place, a classification fold's scores as written before
    2026-11-28, when `rocauc` was the ROC-AUC of the probabilities: that is
    `rocauc_prob` now, and `rocauc` is the ROC-AUC of the labels, Matbench's, which
    those versions recorded as `balanced_accuracy` (the same number) where they
    recorded it at all. Entries written since, and predictions entries, are left
    as they are."""
    for scores in (entry, entry.get("val"), *entry.get("members", [])):
        if not isinstance(scores, dict) or "rocauc" not in scores or (
                "rocauc_prob" in scores or "mbid" in scores):
            continue
        scores["rocauc_prob"] = scores.pop("rocauc")
        if "balanced_accuracy" in scores:
            scores["rocauc"] = scores.pop("balanced_accuracy")
    if "val_rocauc" in entry and "val_rocauc_prob" not in entry:
        entry["val_rocauc_prob"] = entry.pop("val_rocauc")


def update_json_results(
    path: str | os.PathLike, update: Callable[[dict[str, Any]], None]
) -> None:
    """Apply `update` to the file's content under an exclusive file lock and replace
    the file atomically: concurrent writers (SLURM array elements) never lose each
    other's entries, and readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=600):
        data = read_json_results(path)
        update(data)
        with atomic_path(path) as tmp:
            write_json(tmp, data, compact=path.name.endswith(".gz"),
                       gz=path.name.endswith(".gz"))


def merge_fold_result(
    path: str | os.PathLike, task: str, fold: int, entry: dict[str, Any]
) -> None:
    """Set data[task][fold_k] = entry in a results file, keeping everything else."""

    def update(data: dict[str, Any]) -> None:
        data.setdefault(task, {})[f"fold_{fold}"] = entry

    update_json_results(path, update)


def merge_fold_results(preds_path: str | os.PathLike, scores_path: str | os.PathLike,
                       task: str, folds: dict[int, tuple[dict, dict]]) -> None:
    """Merge folds' (predictions entry, scores entry) into a run's two files as one
    transaction. Under one lock (the scores file's) both files are read, updated
    and written in full to temporary files, then moved into place back to back,
    predictions first, with SIGINT and SIGTERM held off. Predictions whose scores
    are missing (only a SIGKILL in that instant leaves some) are dropped by the next
    merge, so both files hold the same folds. Temporary files a killed writer left
    are removed."""
    preds_path, scores_path = Path(preds_path), Path(scores_path)
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{scores_path}.lock", timeout=600):
        for path in (preds_path, scores_path):  # under the lock, temporary files are
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's
                stale.unlink(missing_ok=True)
        _merge_locked(preds_path, scores_path, task, folds)


def _merge_locked(preds_path: Path, scores_path: Path, task: str,
                  folds: dict[int, tuple[dict, dict]]) -> None:
    import signal

    with temp_beside(preds_path) as preds_tmp, temp_beside(scores_path) as scores_tmp:
        preds, scores = read_json_results(preds_path), read_json_results(scores_path)
        for fold, (preds_entry, scores_entry) in folds.items():
            preds.setdefault(task, {})[f"fold_{fold}"] = preds_entry
            scores.setdefault(task, {})[f"fold_{fold}"] = scores_entry
        for name in list(preds):  # orphans: no scores, so the fold counts as missing
            for key in [k for k in preds[name] if k not in scores.get(name, {})]:
                del preds[name][key]
            if not preds[name]:
                del preds[name]
        write_json(preds_tmp, preds, compact=True, gz=preds_path.name.endswith(".gz"))
        write_json(scores_tmp, scores)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            os.replace(preds_tmp, preds_path)
            os.replace(scores_tmp, scores_path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def open_maybe_gzip(path: str | os.PathLike) -> Any:
    """Open a text file that may be gzip-compressed (matbench's results.json.gz files
    are sometimes plain JSON despite their name)."""
    with open(path, "rb") as file:
        magic = file.read(2)
    return gzip.open(path, "rt") if magic == b"\x1f\x8b" else open(path)
