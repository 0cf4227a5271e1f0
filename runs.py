"""Run bookkeeping shared by the scripts: the models, every hyperparameter with its
default and help (run_matbench.py's flags are derived from them), the checks of a
run's arguments, which (task, fold) pairs a run has done, and where its results
live. Light to import: no torch.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from mat_bench import (
    ALL_TASKS,
    DATA_PATHS,
    N_FOLDS,
    ROOT,
    STRUCTURE_TASKS,
    TASK_INFO,
)
from mat_bench.data import (
    ArgumentParser,
    UserError,
    check_fold,
    check_task,
    load_featurized,
    merge_fold_results,
    preds_file,
    read_json_results,
    read_run_preds,
    scores_file,
)

MODELS = ("roostformer", "wrenformer")
TORCH_FEEDFORWARD = 2048  # nn.TransformerEncoderLayer's width, which aviary keeps

# every hyperparameter in one place: (default, help). The defaults are those of the
# committed results; run_matbench.py's flags, their types and --help come from here.
HYPERPARAMETERS: dict[str, tuple[Any, str]] = {
    "epochs": (300, "training epochs"),
    "batch_size": (128, "materials per step and member"),
    "learning_rate": (1e-3, "AdamW's peak learning rate"),
    "weight_decay": (1e-2, "AdamW's decoupled weight decay"),
    "warmup_frac": (0.05, "share of the steps with a linear warm-up, then cosine "
                          "decay"),
    "n_attn_layers": (3, "transformer encoder layers"),
    "d_model": (128, "width of the transformer"),
    "n_attn_heads": (4, "attention heads"),
    "dim_feedforward": (TORCH_FEEDFORWARD, "width of the encoder layers' "
                                           "feed-forward network (torch's and "
                                           "aviary's)"),
    "dropout": (0.0, "dropout in the encoder"),
    "embedding_aggregations": (("mean",), "pooling of the transformer output over a "
                                          "material's tokens: mean std sum min max"),
    "frac_encoding_dims": (64, "dims of the sinusoidal fraction encoding, 0 = off"),
    "robust": (False, "aviary's robust L1 loss with a learned uncertainty"),
    "gate": (False, "regression tasks (others ignore it): the prediction times the "
                    "sigmoid of a second output, as CrabNet's, so it can be exactly 0"),
    "log_target": (False, "regression tasks (others ignore it): fit the log of the "
                          "targets (all must be above 0) and predict exp of the "
                          "output. L1's best prediction, the median, is the same; "
                          "the scale the model learns on is not"),
    "frac_jitter": (0.02, "training augmentation: fractions x (1 + jitter x N(0, 1)), "
                          "renormalized, as CrabNet's (chosen on validation: README)"),
    "ensemble_aggregation": ("auto", "a fold's prediction from its --ensemble "
                                     "members: mean, median, or auto: the median "
                                     "for regression, the mean probability for "
                                     "classification (chosen on validation: "
                                     "README)"),
    "epoch_choice": (False, "each member predicts with its weights from the epoch "
                            "(of every 10th, and the last) with its best "
                            "validation score, not the last epoch's (chosen on "
                            "validation per task: README)"),
    "prior_threshold": (True, "classification tasks (others ignore it): labels above "
                              "the training split's share of class 1 instead of 0.5: "
                              "for calibrated probabilities the threshold with the "
                              "best balanced accuracy, which Matbench's ROC-AUC of "
                              "labels is (chosen on validation: README)"),
    "val_threshold": (False, "classification tasks (others ignore it): labels at the "
                             "threshold with the best balanced accuracy on the "
                             "validation split instead of 0.5 (overrides "
                             "--prior-threshold)"),
    "wyckoff_features": ("max", "wrenformer (roostformer ignores it): aviary's Wyckoff "
                                "features as they are (raw: counts up to 192, beside "
                                "element features of norm 1) or each divided by its "
                                "largest value, to [0, 1] (max; chosen on validation: "
                                "README)"),
    "val_fraction": (0.1, "share of each training fold held out for validation"),
    "seed": (0, "seed of the first member; member k of a fold has seed + k"),
    "amp": (None, "bf16 compute with fp32 master weights: autocast on CUDA, a bf16 "
                  "copy of the model on a CPU (None: on for CUDA, off for CPU)"),
}
DEFAULTS: dict[str, Any] = {key: default
                             for key, (default, _) in HYPERPARAMETERS.items()}
# where a task's default differs, chosen on validation by one rule (README "Choosing
# the recipe", stages F, H and I; tests check that this follows from the committed
# tables and scores): a lever is proposed for a task where it lowers the validation
# error (MAE, or 1 - ROC-AUC of the probabilities) by more than VALIDATION_MARGIN in
# a screen on folds 0 and 1 (benchmarks/recipe_search/stageF*.csv: the fraction
# encoding off; stageH_dielectric.csv: the best of its levers; stageI_phonons.csv:
# a log target), and it stands unless the full 5-fold runs, once they exist both
# ways, say otherwise on their own validation splits (MODEL-v2 without it, MODEL-v3
# with it; for Wrenformer's log target on phonons, wrenformer-v3 without and -v4
# with it). Dropped that way: the encoding off on jdft2d, the log target on
# dielectric.
TASK_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("roostformer", "matbench_glass"): {"frac_encoding_dims": 0, "epoch_choice": True},
    ("roostformer", "matbench_phonons"): {"frac_encoding_dims": 0},
    ("wrenformer", "matbench_phonons"): {"frac_encoding_dims": 0, "log_target": True},
}
VALIDATION_MARGIN = 0.02
CHOICES = {"ensemble_aggregation": ("auto", "mean", "median"),
           "wyckoff_features": ("raw", "max")}
AUTO_AGGREGATION = {"regression": "median", "classification": "mean"}


# the model's own hyperparameters (aviary's Wrenformer and MatbenchTransformer take
# them under these names)
MODEL_KEYS = ("d_model", "n_attn_layers", "n_attn_heads", "dim_feedforward",
              "dropout", "embedding_aggregations", "frac_encoding_dims",
              "wyckoff_features")
# earlier names -> today's: old results, checkpoints, flags and calls still read
RENAMED = {"n_heads": "n_attn_heads", "frac_encoding": "frac_encoding_dims"}
# what runs and checkpoints made before a hyperparameter existed did, in its terms
BEFORE_IT_EXISTED: dict[str, Any] = {"dim_feedforward": TORCH_FEEDFORWARD,
                                     "gate": False, "frac_jitter": 0.0,
                                     "ensemble_aggregation": "mean",
                                     "val_threshold": False,
                                     "wyckoff_features": "raw",
                                     "prior_threshold": False,
                                     "epoch_choice": False}
AT_ANY_VALUE = ("amp", "seed")  # hyperparameters that do not set a run's recipe


def task_defaults(model: str | None, task: str | None) -> dict[str, Any]:
    """Every hyperparameter's default for `model` on `task`: DEFAULTS, with the
    task's own where TASK_DEFAULTS has one."""
    return {**DEFAULTS, **TASK_DEFAULTS.get((model or "", task or ""), {})}


def with_task_defaults(params: dict[str, Any], model: str | None,
                       task: str | None) -> dict[str, Any]:
    """`params` completed for `model` on `task`: a hyperparameter not given, or
    given as None where its default is not None (a flag left at "the task's
    default"), takes task_defaults'."""
    base = task_defaults(model, task)
    return {**base, **{key: value for key, value in params.items()
                       if value is not None or base.get(key) is None}}


def recorded_params(params: dict[str, Any]) -> dict[str, Any]:
    """A run's or checkpoint's recorded hyperparameters, completed with what it did
    for those added since (BEFORE_IT_EXISTED, else today's default)."""
    params = {RENAMED.get(key, key): value for key, value in params.items()}
    return {**DEFAULTS, **BEFORE_IT_EXISTED, **params}


def acts(key: str, model: str | None, task: str | None) -> bool:
    """Whether a hyperparameter acts in a run of `model` on `task` (None: unknown,
    so it may): the gate and log target on regression tasks only, the thresholds on
    classification only, the Wyckoff features in Wrenformer only."""
    task_type = TASK_INFO[task].task_type if task in TASK_INFO else None
    if key in ("gate", "log_target"):
        return task_type != "classification"
    if key in ("val_threshold", "prior_threshold"):
        return task_type != "regression"
    if key == "wyckoff_features":
        return model != "roostformer"
    return True


def acting_params(params: dict[str, Any], model: str | None = None,
                  task: str | None = None) -> dict[str, Any]:
    """recorded_params without the hyperparameters that do not act in a run of
    `model` on `task` (params' own model and task where it records them), lists as
    tuples: what a checkpoint must match to be resumed."""
    params = recorded_params(params)
    model, task = params.get("model", model), params.get("task", task)
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in params.items() if acts(key, model, task)}


def recipe(params: dict[str, Any], model: str | None = None,
           task: str | None = None) -> dict[str, Any]:
    """The hyperparameters that set a run's results: acting_params without
    precision and seed. Two runs with equal recipes train the same way."""
    return {key: value for key, value in acting_params(params, model, task).items()
            if key not in AT_ANY_VALUE}


def at_defaults(params: dict[str, Any]) -> bool:
    """Whether a run's recorded params (with its model and task) are today's
    defaults, for the hyperparameters that act in it (precision and seed are not
    compared)."""
    ours = recipe(params)
    model, task = params.get("model"), params.get("task")
    defaults = recipe({**task_defaults(model, task), "model": model, "task": task})
    return all(ours[key] == value for key, value in defaults.items()
               if key in DEFAULTS)


def add_hyperparameter_args(parser: argparse.ArgumentParser | Any) -> None:
    """A flag per hyperparameter (--batch-size for batch_size, and the earlier name
    of a renamed one as an alias), its type, default and help from HYPERPARAMETERS:
    switches (bool, or None for the device's choice) take --x/--no-x, tuples take
    one or more values."""
    old_names = {new: old for old, new in RENAMED.items()}
    for key, (default, help_text) in HYPERPARAMETERS.items():
        flags = [f"--{name.replace('_', '-')}" for name in (key, old_names.get(key))
                 if name]
        per_task = {f"{model} on {task}": values[key]
                    for (model, task), values in TASK_DEFAULTS.items() if key in values}
        if per_task:  # left unset (None), it takes the task's default
            help_text = (f"{help_text} (default: {default}; "
                         + ", ".join(f"{value} for {where}"
                                     for where, value in per_task.items())
                         + ", chosen on validation: README)")
        unset = None if per_task else default
        if default is None or isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                default=unset, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(*flags, nargs="+", choices=CHOICES.get(key),
                                default=None if per_task else list(default),
                                help=help_text)
        else:
            parser.add_argument(*flags, type=type(default), default=unset,
                                choices=CHOICES.get(key), help=help_text)


# --- checks: one clear line before anything is loaded or written ---------------
def check_model_task(model: str, task: str) -> None:
    """Raise UserError for an unknown model or task, or Wrenformer on a task without
    crystal structures."""
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: use roostformer or wrenformer")
    check_task(task)
    if model == "wrenformer" and task not in STRUCTURE_TASKS:
        raise UserError(
            f"wrenformer needs crystal structures but {task} is a composition-only "
            "task: use --model roostformer for it"
        )


def check_args(model: str, task: str, fold: int, params: dict[str, Any],
               wandb_mode: str, checkpoint: str) -> None:
    """Raise UserError for any bad argument, before anything is loaded or written."""
    check_model_task(model, task)
    check_fold(fold)
    for key in ("epochs", "batch_size", "n_attn_layers", "d_model", "n_attn_heads",
                "dim_feedforward"):
        if params[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, "
                            f"got {params[key]}")
    if params["d_model"] % params["n_attn_heads"]:
        raise UserError(f"--d-model {params['d_model']} must be divisible by "
                        f"--n-attn-heads {params['n_attn_heads']}")
    if not 0 <= params["val_fraction"] < 0.5:
        raise UserError("--val-fraction must be in [0, 0.5)")
    ranges = {  # flag: (lowest, highest, highest included), all finite
        "learning_rate": (0.0, math.inf, False), "weight_decay": (0.0, math.inf, False),
        "warmup_frac": (0.0, 1.0, True), "dropout": (0.0, 1.0, False),
        "seed": (0, math.inf, False)}
    for key, (low, high, high_ok) in ranges.items():
        value = params[key]
        above_low = value > low if key == "learning_rate" else value >= low
        below_high = value <= high if high_ok else value < high
        if not (math.isfinite(value) and above_low and below_high):
            flag = f"--{key.replace('_', '-')}"
            want = {"learning_rate": "a finite number above 0",
                    "weight_decay": "a finite number, 0 or more",
                    "warmup_frac": "in [0, 1]", "dropout": "in [0, 1)",
                    "seed": "a whole number, 0 or more"}[key]
            raise UserError(f"{flag} must be {want}, got {value}")
    if not (math.isfinite(params["frac_jitter"]) and 0 <= params["frac_jitter"] < 0.5):
        raise UserError("--frac-jitter must be in [0, 0.5), got "
                        f"{params['frac_jitter']}")
    if params["ensemble_aggregation"] not in CHOICES["ensemble_aggregation"]:
        raise UserError("--ensemble-aggregation must be auto, mean or median, got "
                        f"{params['ensemble_aggregation']!r}")
    if params["wyckoff_features"] not in CHOICES["wyckoff_features"]:
        raise UserError("--wyckoff-features must be raw or max, got "
                        f"{params['wyckoff_features']!r}")
    if (params["log_target"] and params["gate"]
            and TASK_INFO[task].task_type == "regression"):
        raise UserError("--log-target (some tasks' default) and --gate cannot be "
                        "combined (the gate predicts exact zeros, which have no log): "
                        "drop --gate or add --no-log-target")
    if params["val_threshold"] and not params["val_fraction"]:
        raise UserError("--val-threshold needs a validation split: set --val-fraction "
                        "above 0")
    if params["epoch_choice"] and not params["val_fraction"]:
        raise UserError("--epoch-choice (some tasks' default) chooses each member's "
                        "epoch on its validation split: set --val-fraction above 0, "
                        "or add --no-epoch-choice")
    if params["frac_encoding_dims"] < 0 or params["frac_encoding_dims"] % 4:
        raise UserError("--frac-encoding-dims must be 0 or a positive multiple of 4")
    aggs = list(params["embedding_aggregations"])
    bad_aggs = set(aggs) - {"mean", "std", "sum", "min", "max"}
    if bad_aggs or not aggs:
        raise UserError("--embedding-aggregations takes one or more of mean std sum "
                        f"min max, got {aggs}")
    if len(set(aggs)) < len(aggs):
        raise UserError(f"--embedding-aggregations lists one twice, got {aggs}: name "
                        "each once")
    if wandb_mode not in ("disabled", "offline", "online"):
        raise UserError("--wandb must be disabled, offline or online")
    if checkpoint not in ("none", "local"):
        raise UserError("--checkpoint must be none or local")


def check_log_target(task: str, targets: pd.Series) -> None:
    """UserError unless every target of `task` has a log (--log-target)."""
    targets = pd.to_numeric(targets, errors="coerce")
    low = targets[targets <= 0]
    if len(low):
        raise UserError(f"--log-target needs targets above 0, but {len(low)} of "
                        f"{task}'s are not (smallest {low.min():g}): drop "
                        "--log-target")


def check_task_recipe(model: str, task: str, params: dict[str, Any]) -> None:
    """For a request of several tasks (run_folds.py, slurm_submit.py), before any job
    starts: UserError where its flags (`params`, None where each task takes its own
    default) cannot run on `task`: check_args at the task's defaults, and a log
    target that the task's featurized targets (where the file exists) have none
    for."""
    params = with_task_defaults(params, model, task)
    check_args(model, task, 0, params, "disabled", "none")
    if (params["log_target"] and acts("log_target", model, task)
            and os.path.isfile(DATA_PATHS[task])):
        check_log_target(task, load_featurized(task)["target"])


RUN_NAME_PATTERN = r"[\w+@=-][\w.+@=-]*"  # a plain file name: no path, no leading dot


def check_run_name(run_name: str) -> None:
    """Raise UserError unless run_name can name the results files."""
    if not re.fullmatch(RUN_NAME_PATTERN, run_name):
        raise UserError(f"--run-name {run_name!r} must be a plain file name: letters, "
                        "digits and . _ - + @ =, not starting with a dot")


def check_device(device: str | None) -> None:
    """Raise UserError for a device torch cannot train on here."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r} is not supported: use cpu or cuda "
                        "(cuda:N for the N-th GPU)")


def check_out_dir(out_dir: Path) -> None:
    """Raise UserError unless out_dir is (or can be made) a writable folder."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"--out-dir {out_dir}: {existing} is a file, not a folder: "
                        "choose another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {out_dir}: {existing} is not writable: choose "
                        "another --out-dir")


def check_folds(folds: Sequence[int], ensemble: int) -> None:
    """Raise UserError for bad --folds or --ensemble values."""
    if not folds:
        raise UserError("give at least one fold: --fold F or --folds F [F ...]")
    for fold in folds:
        check_fold(fold)
    if len(set(folds)) != len(folds):
        raise UserError(f"--folds {' '.join(map(str, folds))} repeats a fold")
    if ensemble < 1:
        raise UserError(f"--ensemble must be at least 1, got {ensemble}")


def default_run_name(model: str) -> str:
    """A run name from the model and the time: roostformer-2026-11-28@10-15."""
    return f"{model}-{datetime.datetime.now():%Y-%m-%d@%H-%M}"


# --- where a run's results live ----------------------------------------------------
def scores_path(out_dir: str | os.PathLike, run_name: str) -> Path:
    """The run's merged scores file: OUT_DIR/model_scores/RUN.json."""
    return scores_file(Path(out_dir) / "model_scores", run_name)


def preds_path(out_dir: str | os.PathLike, run_name: str, task: str) -> Path:
    """The run's predictions on a task: OUT_DIR/model_preds/RUN/TASK.json.gz."""
    return preds_file(Path(out_dir) / "model_preds", run_name, task)


def checkpoint_path(out_dir: str | os.PathLike, run_name: str, task: str,
                    folds: Sequence[int], ensemble: int) -> Path:
    """Where a run's checkpoint lives (one file per task and set of members)."""
    name = f"{task}-{fold_tag(folds)}"
    if ensemble > 1 or len(folds) > 1:
        name += f"-ensemble_{ensemble}"
    return Path(out_dir) / "checkpoints" / run_name / f"{name}.pt"


def fold_tag(folds: Sequence[int]) -> str:
    """fold_3, or folds_0-1-2-3-4 for folds trained together."""
    return (f"fold_{folds[0]}" if len(folds) == 1
            else f"folds_{'-'.join(map(str, folds))}")


# --- what a run covers and has done -----------------------------------------------
def has_wyckoff_labels(task: str) -> bool:
    """Whether the task's featurized file exists and holds at least one Wyckoff
    (protostructure) label, which Wrenformer needs."""
    path = DATA_PATHS[task]
    if not os.path.isfile(path):
        return False
    try:
        if "protostructure" not in pd.read_csv(path, nrows=0).columns:
            return False
        labels = pd.read_csv(path, usecols=["protostructure"]).protostructure
    except Exception as exc:  # unreadable file: say which and how to fix it
        raise UserError(
            f"featurized file {path} is unreadable ({type(exc).__name__}): rebuild it "
            f"with `python featurize_matbench.py --tasks {task} --force`"
        ) from exc
    return bool(labels.notna().any())


def wrenformer_tasks() -> list[str]:
    """Structure tasks whose featurized file has Wyckoff labels."""
    return [task for task in STRUCTURE_TASKS if has_wyckoff_labels(task)]


def select_pairs(model: str, tasks: Sequence[str] | None,
                 folds: Sequence[int] | None) -> list[tuple[str, int]]:
    """The (task, fold) pairs of a run: Roostformer on all tasks, Wrenformer on the
    structure tasks with Wyckoff labels, narrowed by `tasks` and `folds`. Raises
    UserError for an unknown task or fold, a model/task pair that cannot run, or a
    task that has not been featurized."""
    folds = sorted(set(range(N_FOLDS) if folds is None else folds))
    for fold in folds:
        check_fold(fold)
    if tasks:
        for task in tasks:
            check_task(task)
        tasks = list(dict.fromkeys(tasks))  # drop repeats, keep order
    if model == "wrenformer":
        if tasks is None or not tasks:
            tasks = wrenformer_tasks()
            if not tasks:
                raise UserError(
                    "no featurized structure task has Wyckoff labels, so Wrenformer "
                    "has nothing to run: featurize a task whose structures are "
                    "available (`python featurize_matbench.py --tasks "
                    "matbench_phonons`)"
                )
        for task in tasks:
            check_model_task(model, task)
            if os.path.isfile(DATA_PATHS[task]) and not has_wyckoff_labels(task):
                raise UserError(
                    f"{task} has no Wyckoff labels in {DATA_PATHS[task]} (its "
                    "structures were not available when it was featurized), so "
                    "wrenformer cannot run on it; labelled tasks here: "
                    f"{', '.join(wrenformer_tasks()) or 'none'}"
                )
    elif not tasks:
        tasks = list(ALL_TASKS)
    missing = [task for task in tasks if not os.path.isfile(DATA_PATHS[task])]
    if missing:
        raise UserError(
            f"not featurized yet: {', '.join(missing)} (looked in "
            f"{os.path.dirname(DATA_PATHS[missing[0]])}): run `python "
            f"featurize_matbench.py --tasks {' '.join(missing)}` before submitting"
        )
    return [(task, fold) for task in tasks for fold in folds]


def done_pairs(path: str | os.PathLike, model: str) -> set[tuple[str, int]]:
    """(task, fold) pairs that a scores file already holds. Raises UserError if the
    file holds another model's results (a reused run name)."""
    done = set()
    for task, folds in read_json_results(path).items():
        for key, entry in (folds or {}).items():
            if not re.fullmatch(r"fold_\d+", key):
                continue
            other = (entry or {}).get("params", {}).get("model", model)
            if other != model:
                raise UserError(
                    f"{path} holds {other} results ({task} {key}), not {model}: "
                    "pick another --run-name"
                )
            done.add((task, int(key[5:])))
    return done


def check_same_recipe(path: str | os.PathLike, model: str, task: str,
                      params: dict[str, Any], ensemble: int) -> None:
    """UserError if a run's scores file holds folds of `task` trained with another
    recipe (`recipe`: precision and seed may differ) or another ensemble size than
    `params` and `ensemble` would: one run name, one recipe per task, so that its
    5 folds score one model."""
    def settings(run_params: dict[str, Any], members: int) -> dict[str, Any]:
        hyper = recipe({**run_params, "model": model, "task": task})
        return {**{key: value for key, value in hyper.items() if key in DEFAULTS},
                "ensemble": members}

    ours = settings(with_task_defaults(params, model, task), ensemble)
    for fold_key, entry in (read_json_results(path).get(task) or {}).items():
        if not re.fullmatch(r"fold_\d+", fold_key) or not isinstance(entry, dict):
            continue
        recorded = entry.get("params") or {}
        theirs = settings(recorded, recorded.get("ensemble", 1))
        differ = [key for key in ours if theirs.get(key) != ours[key]]
        if differ:
            said = ", ".join(f"{key} {theirs.get(key)!r} (this run: {ours[key]!r})"
                             for key in differ)
            raise UserError(
                f"{path} records {task} {fold_key} with other settings: {said}; "
                "repeat that run's flags to add folds to it, or use another "
                "--run-name"
            )


def merge_run_results(src: str | os.PathLike, dest: str | os.PathLike
                      ) -> list[tuple[str, str, int, str]]:
    """Merge the runs recorded under SRC (model_scores/ and model_preds/, e.g. from
    a lent GPU machine) into DEST's, fold by fold, each under DEST's lock with an
    atomic replace. A fold DEST already holds is kept, not overwritten; a fold SRC
    holds without its predictions, or at another recipe than DEST's folds of its task
    (check_same_recipe), is refused. Returns (run, task, fold, "merged" or
    "kept") for every fold of SRC."""
    plan = []  # everything is checked before anything is written
    for path in sorted((Path(src) / "model_scores").glob("*.json")):
        run = path.stem
        scores = read_json_results(path)
        preds = read_run_preds(Path(src) / "model_preds", run)
        model = next((entry.get("params", {}).get("model") for folds in
                      scores.values() for entry in folds.values()), None)
        done = done_pairs(scores_path(dest, run), model) if model else set()
        for task, folds in scores.items():
            for key, entry in folds.items():
                fold = int(key[5:])
                if key not in preds.get(task, {}):
                    raise UserError(f"{path} records {task} {key} but its predictions "
                                    "are missing: copy model_preds/ along with it")
                if (task, fold) not in done:
                    recorded = entry.get("params") or {}
                    check_same_recipe(scores_path(dest, run), model, task,
                                      recorded_params(recorded),
                                      recorded.get("ensemble", 1))
                plan.append((run, task, fold, entry, preds[task][key],
                             (task, fold) in done))
    merged = []
    for run, task, fold, entry, preds_entry, kept in plan:
        if not kept:
            merge_fold_results(preds_path(dest, run, task), scores_path(dest, run),
                               task, {fold: (preds_entry, entry)})
        merged.append((run, task, fold, "kept" if kept else "merged"))
    return merged


# --- run_matbench.py's arguments, checked before any job starts --------------
# filled in by the job script; $FOLDS unquoted: one word per fold (--per-task)
TASK_VAR, FOLD_VAR, FOLDS_VAR = '"$TASK"', '"$FOLD"', "$FOLDS"


def gpu_count(gpus_per_node: str) -> int:
    """The number in --gpus-per-node's `N` or `TYPE:N`."""
    return int(gpus_per_node.rsplit(":", 1)[-1])


PARENT_PID_ENV = "MAT_BENCH_PARENT_PID"  # run_folds.py's PID, in its jobs' environment


def stop_when_parent_dies() -> None:
    """In a job of run_folds.py (which names itself in $MAT_BENCH_PARENT_PID): have
    Linux send this process SIGTERM when run_folds.py dies, even by SIGKILL, so that
    no training goes on alone; it then stops as on any SIGTERM (after its epoch,
    with a checkpoint). Elsewhere, or on another OS, nothing."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(parent):  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def run_matbench_args(model: str, run_name: str, out_dir: str | os.PathLike,
                      extra: Sequence[str], gpus_per_node: str,
                      requeue: bool, per_task: bool = False) -> list[str]:
    """run_matbench.py's arguments for an element, with TASK_VAR and FOLD_VAR (or,
    per task, FOLDS_VAR) for the shell to fill in. The device follows --gpus-per-node
    and --requeue turns on checkpoints, unless `extra` (the user's pass-through
    flags, last) says otherwise."""
    folds = ["--folds", FOLDS_VAR] if per_task else ["--fold", FOLD_VAR]
    args = ["--model", model, "--task", TASK_VAR, *folds,
            "--run-name", run_name, "--out-dir", str(out_dir),
            "--device", "cuda" if gpu_count(gpus_per_node) else "cpu",
            "--no-progress"]
    if requeue:
        args += ["--checkpoint", "local"]
    return args + list(extra)


def check_run_args(args: Sequence[str], model: str, run_name: str,
                   out_dir: str | os.PathLike, requeue: bool,
                   caller: str = "slurm_submit.py",
                   tasks: Sequence[str] | None = None) -> tuple[dict[str, Any], int]:
    """Check an element's run_matbench.py arguments (from run_matbench_args) with its
    own parser and argument checks, each of `tasks` (None: every task) with its own
    defaults, so that a typo or a clash with a task's default fails here, not in
    every element. `caller` (slurm_submit.py or run_folds.py) is the script the
    messages name. Returns the elements' hyperparameters (None where each task
    takes its own default: with_task_defaults) and ensemble size."""
    takes = ALL_TASKS if model == "roostformer" else STRUCTURE_TASKS
    tasks = [task for task in (tasks or takes) if task in takes] or [takes[0]]
    parser = build_run_parser()

    def refuse(message: str) -> NoReturn:  # argparse's reason, in one line
        raise UserError(f"run_matbench.py: {message} (a flag {caller} passes on; "
                        f"--task and --fold are set by {caller}: use --tasks and "
                        "--folds)")

    parser.error = refuse  # type: ignore[method-assign]
    sentinel = {TASK_VAR: "<task of the element>", FOLD_VAR: "99999",
                FOLDS_VAR: "99999"}
    ns, unknown = parser.parse_known_args([sentinel.get(arg, arg) for arg in args])
    if unknown:
        raise UserError(
            f"run_matbench.py does not take {' '.join(unknown)} (see `python "
            f"run_matbench.py --help`; options of {caller}: `python {caller} --help`)"
        )
    per_task = FOLDS_VAR in args
    for flag, value in (("--model", model), ("--task", sentinel[TASK_VAR]),
                        ("--folds", [99999]) if per_task else ("--fold", 99999),
                        ("--run-name", run_name), ("--out-dir", str(out_dir))):
        if getattr(ns, flag[2:].replace("-", "_")) != value:
            hint = {"--task": "use --tasks", "--fold": "use --folds",
                    "--folds": "use --folds"}.get(
                flag, "give it once, spelled out in full")
            raise UserError(f"{flag} is set by {caller} for each job: {hint}")
    if ns.cuda_graphs and (ns.device != "cuda" or model != "roostformer"):
        gpus = ("--gpus-per-node 1 or more" if caller == "slurm_submit.py"
                else "--device cuda")
        raise UserError(f"--cuda-graphs needs GPUs ({gpus}) and --model roostformer: "
                        "drop --cuda-graphs")
    if ns.ensemble < 1:
        raise UserError(f"--ensemble must be at least 1, got {ns.ensemble}")
    if requeue and ns.checkpoint != "local":
        raise UserError("--requeue resumes from checkpoints: drop --checkpoint none")
    params = {key: getattr(ns, key) for key in DEFAULTS}  # None: the task's default
    params["embedding_aggregations"] = tuple(params["embedding_aggregations"])
    for task in tasks:
        try:
            check_args(model, task, 0, with_task_defaults(params, model, task),
                       ns.wandb, ns.checkpoint)
        except UserError as exc:  # name the task whose own defaults clash
            if (model, task) in TASK_DEFAULTS:
                raise UserError(f"{task}: {exc}") from None
            raise
    check_device(ns.device)
    return params, ns.ensemble




def build_run_parser(description: str | None = None) -> argparse.ArgumentParser:
    """run_matbench.py's command line (slurm_submit.py and run_folds.py check the
    flags they pass on with it)."""
    parser = ArgumentParser(prog="run_matbench.py", description=description)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--task", required=True, help="a Matbench v0.1 task name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="one fold, 0 to 4")
    which.add_argument("--folds", type=int, nargs="+",
                       help="several folds, trained together (stacked) in one process")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="models per fold, seeds SEED .. SEED+E-1, stacked with "
                        "the folds; a fold's prediction aggregates theirs")
    add_hyperparameter_args(parser.add_argument_group("hyperparameters"))
    parser.add_argument("--device", default=None, help="cpu or cuda (None: cuda if "
                        "available)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture the whole training step in a CUDA graph "
                        "(Roostformer on CUDA; experimental)")
    parser.add_argument("--run-name", default=None, help="results file name (None: "
                        "model and timestamp); jobs sharing it share the files")
    parser.add_argument("--out-dir", default=ROOT,
                        help="folder holding model_scores/ and model_preds/")
    parser.add_argument("--wandb", default="disabled",
                        choices=["disabled", "offline", "online"], help="W&B logging")
    parser.add_argument("--wandb-project", default="matbench", help="W&B project")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (None: "
                        "yours)")
    parser.add_argument("--checkpoint", default="none", choices=["none", "local"],
                        help="local: save OUT_DIR/checkpoints/RUN/TASK-fold_F.pt every "
                        "10 epochs (2 minutes at least), at the end and on SIGTERM, "
                        "and resume from it")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")
    return parser
