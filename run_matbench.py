r"""Train and test Roostformer or Wrenformer on Matbench tasks: one fold, or several
folds and an ensemble per fold stacked into one model on the device.

Examples:
    python run_matbench.py --model roostformer --task matbench_expt_gap --fold 0
    python run_matbench.py --model roostformer --task matbench_expt_gap \
        --folds 0 1 2 3 4 --ensemble 5
    python run_matbench.py --model wrenformer --task matbench_phonons --fold 3 \
        --epochs 300 --run-name wrenformer-phonons --wandb offline
    python run_matbench.py --model roostformer --task matbench_steels --fold 0 \
        --frac-encoding-dims 0 --device cuda --checkpoint local

Each test fold's predictions go to OUT_DIR/model_preds/RUN/TASK.json.gz and its
scores to OUT_DIR/model_scores/RUN.json, merged under a file lock so that many jobs
of one run can write at once. Folds are Matbench v0.1's own. A member is a (fold,
seed) pair with its own normalizer, initial weights and batch order; the members of
a fold share one validation split of its training fold (--val-fraction).
--folds F.. --ensemble E trains len(F) x E members at once (seeds SEED .. SEED+E-1
per fold), each fold's prediction aggregating its members' (--ensemble-aggregation).
The validation split never picks a model (the final epoch's model is tested); it
scores the ensemble and, with --val-threshold, picks the classification threshold.
Every hyperparameter's default lives in runs.HYPERPARAMETERS, and where a task's
differs (chosen on validation) in runs.TASK_DEFAULTS.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from mat_bench import CLASS_THRESHOLD, ROOT, TASK_INFO, VAL_METRICS
from mat_bench.data import (
    UserError,
    atomic_path,
    get_fold_ids,
    load_featurized,
    merge_fold_results,
    read_json_results,
)
from mat_bench.runs import (
    AUTO_AGGREGATION,
    DEFAULTS,
    MODEL_KEYS,
    RENAMED,
    acting_params,
    build_run_parser,
    check_args,
    check_device,
    check_folds,
    check_log_target,
    check_out_dir,
    check_run_name,
    check_same_recipe,
    checkpoint_path,
    default_run_name,
    fold_tag,
    preds_path,
    scores_path,
    stop_when_parent_dies,
    with_task_defaults,
)

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
# a checkpoint every 10 epochs, but not sooner than 2 minutes after the last one this
# process saved: on a GPU 10 epochs can take seconds, and a 25-member checkpoint is 1 GB
CHECKPOINT_EPOCHS, CHECKPOINT_MIN_SECONDS = 10, 120.0


class Stopped(Exception):
    """A run stopped by a signal; `code` is the exit status (130 Ctrl-C, 143
    SIGTERM)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_task(model: str, task: str, folds: Sequence[int]
              ) -> tuple[pd.DataFrame, str, dict[int, tuple[list[str], list[str]]]]:
    """The task's featurized rows, the model's input column and each fold's
    Matbench (training ids, test ids)."""
    df = load_featurized(task)
    rebuild = f"rebuild it with `python featurize_matbench.py --tasks {task} --force`"
    if df.index.duplicated().any():
        raise UserError(f"{df.index.duplicated().sum()} Matbench ids of {task} appear "
                        f"more than once in its featurized file: {rebuild}")
    target = pd.to_numeric(df["target"], errors="coerce")
    if target.isna().any():
        bad = df.index[target.isna()][0]
        raise UserError(f"{task}'s featurized file has a missing or non-numeric target "
                        f"(first at {bad}): {rebuild}")
    df["target"] = target
    fold_ids = {fold: get_fold_ids(task, fold) for fold in folds}
    needed = {mbid for train, test in fold_ids.values() for mbid in (*train, *test)}
    missing = needed.difference(df.index)
    if missing:
        raise UserError(
            f"{len(missing)} Matbench ids of {task} are missing from its featurized "
            f"file: rebuild it with `python featurize_matbench.py --tasks {task} "
            "--force`"
        )
    col = "composition"
    if model == "wrenformer":
        col = "protostructure"
        if col not in df or df[col].isna().all():
            raise UserError(
                f"{task} has no Wyckoff labels: its structures were not available when "
                f"it was featurized. Put matbench_{task[9:]}.json.gz in "
                "MATBENCH_RAW_DIR (or go online) and run `python featurize_matbench.py "
                f"--tasks {task} --force`"
            )
    return df, col, fold_ids


def split_members(df: pd.DataFrame, input_col: str,
                  fold_ids: dict[int, tuple[list[str], list[str]]], ensemble: int,
                  seed: int, val_fraction: float) -> tuple[list, pd.DataFrame]:
    """One Member per (fold, seed): seeds seed .. seed + ensemble - 1, sharing one
    validation split of their training fold (drawn with `seed`), so that the
    ensemble can be scored on it. Rows without an input (Wrenformer: no Wyckoff
    label) are left out of training. Returns the members (indices into `rows`) and
    `rows`, the materials with an input."""
    from mat_bench.training import Member

    rows = df[df[input_col].notna()]
    position = pd.Series(np.arange(len(rows)), index=rows.index)
    members = []
    for fold, (train_ids, _) in fold_ids.items():
        train_rows = position.reindex(train_ids).dropna().to_numpy(np.int64)
        n_val = round(val_fraction * len(train_rows))
        perm = np.random.default_rng(seed).permutation(len(train_rows))
        for member_seed in range(seed, seed + ensemble):
            members.append(Member(fold, member_seed, train_rows[perm[n_val:]],
                                  train_rows[perm[:n_val]]))
    return members, rows


def setup_wandb(mode: str, project: str, entity: str | None, run_name: str,
                config: dict[str, Any], out_dir: Path) -> Any:
    """Start a W&B run (None when disabled); never prompts for a login."""
    if mode == "disabled":
        return None
    import wandb

    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        raise UserError("--wandb online needs a W&B login: run `wandb login` or set "
                        "WANDB_API_KEY, or use --wandb offline")
    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, entity=entity, name=run_name, config=config,
                      mode=mode, dir=str(out_dir), reinit="finish_previous",
                      settings=wandb.Settings(silent=True))


def save_checkpoint(path: Path, state: Any, meta: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({
            **meta, "model_params": state.model.model_params,
            "model_state": state.model.state_dict(),
            "optimizer_state": state.optimizer.state_dict(),
            "scheduler_state": state.scheduler.state_dict(),
            "norm_mean": state.norm_mean.cpu(), "norm_std": state.norm_std.cpu(),
            "epoch": state.epoch, "train_seconds": state.train_seconds,
            "val_curve": state.val_curve, "val_curve_preds": state.val_curve_preds,
            "weight_average": [w.cpu() for w in state.weight_average],
            "n_averaged": state.n_averaged,
            "chosen_weights": [w.cpu() for w in state.chosen_weights],
            "chosen_epochs": state.chosen_epochs, "chosen_scores": state.chosen_scores,
        }, tmp)


def check_checkpoint_space(path: Path, state: Any, epoch_choice: bool) -> None:
    """UserError before training if the checkpoint's disk lacks room for one more
    checkpoint (each is written beside the last before it replaces it)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in state.model.parameters())
    # the weights, AdamW's two moments, their average (SWA) and with --epoch-choice
    # the weights of the chosen epochs
    need = (5 if epoch_choice else 4) * weight_bytes
    # the nearest folder that exists: nothing is made before training starts
    free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
    if free < need:
        raise UserError(f"a checkpoint of this run takes {need / 1e9:.2f} GB but "
                        f"{path.parent} has {free / 1e9:.2f} GB free: make room (the "
                        "checkpoints of finished runs can go) or use --checkpoint none")


@contextmanager
def training_lock(path: Path | None) -> Iterator[None]:
    """Hold the lock of checkpoint `path` (none: no lock) for the block: a second
    process that would train the same checkpoint is refused with one line instead
    of repeating the work beside the first. The lock goes with the process that
    holds it, even a killed one, so it never needs clearing by hand."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another process is training this run now (it holds "
                        f"{lock.lock_file}): let it finish, or stop it and rerun "
                        "this command to resume from its checkpoint") from None
    try:
        yield
    finally:
        lock.release()


def resume_from_checkpoint(path: Path, state: Any, meta: dict[str, Any]) -> None:
    """Load a saved state into `state` if `path` exists and was made by the same
    model, hyperparameters and members (for a hyperparameter added since the
    checkpoint was made: what it did then, runs.BEFORE_IT_EXISTED; one that does
    not act in this model and task is not compared)."""
    import torch

    try:
        saved = torch.load(path, map_location=state.norm_mean.device,
                           weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}): "
                        "delete it to start over") from exc
    model, task = meta["model"], meta["task"]
    if isinstance(saved.get("params"), dict):
        saved["params"] = acting_params(saved["params"], model, task)
    meta = {**meta, "params": acting_params(meta["params"], model, task)}
    if any(saved.get(key) != value for key, value in meta.items()):
        raise UserError(f"checkpoint {path} was made with other hyperparameters or "
                        "members: delete it or use another --run-name")
    state.model.load_state_dict(saved["model_state"])
    state.optimizer.load_state_dict(saved["optimizer_state"])
    state.scheduler.load_state_dict(saved["scheduler_state"])
    state.norm_mean.copy_(saved["norm_mean"])
    state.norm_std.copy_(saved["norm_std"])
    state.epoch, state.train_seconds = saved["epoch"], saved["train_seconds"]
    # older checkpoints lack these: the curve and the average go on from here
    state.val_curve = saved.get("val_curve", [])
    state.val_curve_preds = saved.get("val_curve_preds", [])
    state.weight_average = [w.to(state.norm_mean.device)
                            for w in saved.get("weight_average", [])]
    state.n_averaged = saved.get("n_averaged", 0)
    state.chosen_weights = [w.to(state.norm_mean.device)
                            for w in saved.get("chosen_weights", [])]
    state.chosen_epochs = saved.get("chosen_epochs", [])
    state.chosen_scores = saved.get("chosen_scores", [])


def train_or_stop(state: Any, data: Any, cfg: Any, *, ckpt_path: Path | None,
                  ckpt_meta: dict[str, Any], wandb_run: Any, progress: bool) -> None:
    """Train `state` to cfg.epochs, logging each epoch to W&B and saving a checkpoint
    to `ckpt_path` (None: none) every CHECKPOINT_EPOCHS epochs (not sooner than
    CHECKPOINT_MIN_SECONDS after the last save) and at the end. Ctrl-C or SIGTERM
    (SLURM's time limit, preemption): with checkpoints, finish the epoch, save and
    raise Stopped; else, or if asked twice, raise Stopped at once. UserError if the
    training loss is not finite."""
    from mat_bench.training import train

    stop_requested: list[int] = []  # the signal asking to stop after this epoch
    last_save: list[float] = []  # when this process last saved a checkpoint
    warned: set[int] = set()  # members already reported as collapsed

    def on_signal(signum: int, _frame: Any) -> None:
        if ckpt_path is None or stop_requested:
            raise Stopped(f"stopped by {signal.Signals(signum).name} during epoch "
                          f"{state.epoch + 1}; nothing saved", 128 + signum)
        stop_requested.append(signum)
        print(f"{signal.Signals(signum).name}: saving a checkpoint after this epoch, "
              "then stopping (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> bool:
        if not math.isfinite(metrics["train_loss"]):
            raise UserError(f"training diverged: the training loss is "
                            f"{metrics['train_loss']} after epoch {epoch}; try a lower "
                            "--learning-rate")
        for m in metrics.get("collapsed_members", []):
            if m not in warned:
                warned.add(m)
                member = state.members[m]
                print(f"warning: member {m} (fold {member.fold}, seed {member.seed}) "
                      "predicts one value for every validation material after epoch "
                      f"{epoch}: its training collapsed. Unless it recovers it is left "
                      "out of its fold's ensemble; for a full ensemble rerun with a "
                      "lower --learning-rate or another --seed", file=sys.stderr,
                      flush=True)
        if wandb_run is not None:
            wandb_run.log({"epoch": epoch, **{k: v for k, v in metrics.items()
                                              if not isinstance(v, list)}})
        due = epoch % CHECKPOINT_EPOCHS == 0 and (
            not last_save or time.monotonic() - last_save[0] >= CHECKPOINT_MIN_SECONDS)
        if ckpt_path is not None and (stop_requested or due or epoch == cfg.epochs):
            try:
                save_checkpoint(ckpt_path, state, ckpt_meta)
                last_save[:] = [time.monotonic()]
            except (OSError, RuntimeError) as exc:
                # a full disk, say (torch's file writer raises RuntimeError for
                # it); the last checkpoint stays
                if stop_requested:
                    raise UserError(f"stopping after epoch {epoch}, but its checkpoint "
                                    f"could not be written ({exc}); {ckpt_path} holds "
                                    "the last one saved, if any") from exc
                print(f"warning: the checkpoint after epoch {epoch} could not be "
                      f"written ({exc}); training goes on, {ckpt_path} holds the last "
                      "one saved, if any", file=sys.stderr, flush=True)
        return bool(stop_requested)

    handlers = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(state, data, cfg, on_epoch_end=on_epoch_end, progress=progress)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop_requested:
        signum = stop_requested[0]
        if wandb_run is not None:
            wandb_run.finish(exit_code=128 + signum)
        raise Stopped(f"stopped by {signal.Signals(signum).name} after epoch "
                      f"{state.epoch}: checkpoint saved to {ckpt_path}; rerun the "
                      "same command to resume", 128 + signum)


def aggregate(preds: np.ndarray, how: str) -> np.ndarray:
    """A fold's prediction from its members' (members, materials) predictions: their
    mean or median (classification: of the class-1 probabilities)."""
    return np.median(preds, axis=0) if how == "median" else preds.mean(axis=0)


def fold_validation(val_preds: np.ndarray, targets: np.ndarray, task_type: str,
                    aggregation: str, val_threshold: bool,
                    fit_positive_rate: float | None = None,
                    threshold: float = CLASS_THRESHOLD,
                    live: Sequence[int] | None = None) -> dict[str, Any]:
    """A fold's validation record from its members' (members, materials)
    predictions on their shared validation split, the ensemble being that of the
    `live` members (default: all; see live_members): the ensemble's metrics (`val`,
    with the label threshold for classification), the metric runs are compared by
    (`val_mae` or `val_rocauc_prob`: VAL_METRICS) for the ensemble, for each
    aggregation of the members (`val_by_aggregation`) and for each member, and for
    classification the label threshold (`threshold`, unless --val-threshold
    chooses it here), the labels' balanced accuracy (Matbench's ROC-AUC of labels)
    at CLASS_THRESHOLD, the cross-fitted balanced accuracy that choosing the
    threshold buys, and the balanced accuracy at the training split's share of
    class 1, `fit_positive_rate` (for calibrated probabilities the threshold that
    maximizes it, chosen by no search)."""
    from mat_bench.training import (
        best_threshold,
        crossfit_balanced_accuracy,
        score,
    )

    metric = VAL_METRICS[task_type]
    in_ensemble = val_preds if live is None else val_preds[list(live)]
    ensemble = aggregate(in_ensemble, aggregation)
    out: dict[str, Any] = {}
    at_default = score(targets, ensemble, task_type)  # labels at CLASS_THRESHOLD
    out["val"] = at_default
    if task_type == "classification":
        out["threshold"] = (best_threshold(targets, ensemble) if val_threshold
                            else threshold)
        out["val_balanced_accuracy_crossfit"] = crossfit_balanced_accuracy(
            targets, ensemble)
        out["val_balanced_accuracy_default"] = at_default["rocauc"]
        if fit_positive_rate is not None:
            out["val_balanced_accuracy_prior"] = score(
                targets, ensemble, task_type, fit_positive_rate)["rocauc"]
        if out["threshold"] != CLASS_THRESHOLD:
            out["val"] = score(targets, ensemble, task_type, out["threshold"])
    out[f"val_{metric}"] = out["val"][metric]
    if len(val_preds) > 1:
        out["val_by_aggregation"] = {
            how: score(targets, aggregate(in_ensemble, how), task_type)[metric]
            for how in ("mean", "median")}
        out["val_members"] = [score(targets, pred, task_type)[metric]
                              for pred in val_preds]
    return out


def epoch_choice_validation(curve_preds: np.ndarray, curve_epochs: Sequence[int],
                            targets: np.ndarray, task_type: str, aggregation: str,
                            seed: int = 0) -> dict[str, Any]:
    """What choosing each member's epoch on validation would buy, measured without
    bias (cross-fitted), from the members' validation predictions at the curve's
    epochs, `curve_preds` (epochs, members, materials): the split is halved at
    random, each member's epoch is its best on one half and the ensemble of the
    chosen epochs is scored on the other half, then the halves swap. Returns that
    score (`chosen`) beside the last curve epoch's on the same halves (`final`), and
    each half's chosen epochs."""
    from mat_bench.training import score

    metric = VAL_METRICS[task_type]
    sign = 1 if metric == "mae" else -1  # lower is better after the sign
    half = np.random.default_rng(seed).permutation(len(targets)) % 2 == 0
    members = np.arange(curve_preds.shape[1])
    out: dict[str, Any] = {"metric": metric, "chosen": [], "final": [], "epochs": []}
    for pick in (half, ~half):
        judge = ~pick
        if task_type == "classification" and any(
                len(np.unique(targets[part])) < 2 for part in (pick, judge)):
            return {}  # a half without both classes has no ROC-AUC
        on_pick = np.array([[sign * score(targets[pick], curve_preds[t, m, pick],
                                          task_type)[metric]
                             for t in range(len(curve_epochs))] for m in members])
        best = on_pick.argmin(axis=1)
        out["epochs"].append([int(curve_epochs[t]) for t in best])
        for key, preds in (("chosen", curve_preds[best, members]),
                           ("final", curve_preds[-1])):
            out[key].append(score(targets[judge], aggregate(preds[:, judge],
                                                            aggregation),
                                  task_type)[metric])
    out["chosen"], out["final"] = np.mean(out["chosen"]), np.mean(out["final"])
    return out


def live_members(members: Sequence[Any], member_preds: Sequence[np.ndarray]
                 ) -> dict[int, list[int]]:
    """Each fold's members (indices into `members`) that make its ensemble: all but
    those whose predictions (on the validation split, or without one on the
    training split) are one value for every material, as a member whose training
    collapsed predicts (training.collapsed). A fold may be left with none."""
    from mat_bench.training import collapsed

    live: dict[int, list[int]] = {member.fold: [] for member in members}
    for m, member in enumerate(members):
        if collapsed(member_preds[m]):
            print(f"warning: member {m} (fold {member.fold}, seed {member.seed}) "
                  "predicts one value for every material: its training collapsed, "
                  "and it is left out of its fold's ensemble", file=sys.stderr,
                  flush=True)
        else:
            live[member.fold].append(m)
    return live


def validate_folds(state: Any, data: Any, cfg: Any, members: Sequence[Any],
                   targets: np.ndarray, aggregation: str, params: dict[str, Any]
                   ) -> tuple[dict[int, float], dict[int, dict[str, Any]],
                              dict[int, list[int]]]:
    """Each fold's label threshold (classification: its training split's share of
    class 1 with --prior-threshold, else CLASS_THRESHOLD), the validation record
    of its ensemble (none without a validation split), which with --val-threshold
    chooses the threshold instead: never the test fold, and the members that make
    its ensemble (live_members). The record also holds the epoch levers measured
    beside the recipe (measure_epoch_levers)."""
    from mat_bench.training import predict

    folds = list(dict.fromkeys(m.fold for m in members))
    classify = cfg.task_type == "classification"
    # class 1's share of each fold's training split (its members share the split)
    fit_share = {m.fold: float(targets[m.fit_idx].mean()) for m in members}
    labels_at = {fold: fit_share[fold] if params["prior_threshold"] and classify
                 else CLASS_THRESHOLD for fold in folds}
    validation: dict[int, dict[str, Any]] = {}
    if not params["val_fraction"]:
        return labels_at, validation, live_members(
            members, predict(state, data, [m.fit_idx for m in members], cfg))
    val_preds = predict(state, data, [m.val_idx for m in members], cfg)
    live = live_members(members, val_preds)
    for fold in folds:
        idx = [m for m, member in enumerate(members) if member.fold == fold]
        if live[fold]:
            validation[fold] = fold_validation(
                np.stack([val_preds[m] for m in idx]),
                targets[members[idx[0]].val_idx], cfg.task_type, aggregation,
                params["val_threshold"] and classify, fit_share[fold], labels_at[fold],
                [idx.index(m) for m in live[fold]])
    measure_epoch_levers(state, data, cfg, members, targets, aggregation, validation,
                         live)
    return labels_at, validation, live


def measure_epoch_levers(state: Any, data: Any, cfg: Any, members: Sequence[Any],
                         targets: np.ndarray, aggregation: str,
                         validation: dict[int, dict[str, Any]],
                         live: dict[int, list[int]]) -> None:
    """Two levers measured on each fold's validation split beside the recipe, which
    they do not change: the weights averaged over the last epochs (`val_swa`, SWA
    as in CrabNet) and each member's epoch chosen on validation
    (`val_epoch_choice`, cross-fitted: epoch_choice_validation); for the ensemble
    of the fold's `live` members, as the recipe's."""
    from mat_bench.training import predict, score, weights_swapped

    metric = VAL_METRICS[cfg.task_type]
    val_idx = [m.val_idx for m in members]
    swa_preds = None
    if state.n_averaged:
        with weights_swapped(state, state.weight_average):
            swa_preds = predict(state, data, val_idx, cfg)
    for fold, record in validation.items():
        idx = live[fold]
        fold_targets = targets[val_idx[idx[0]]]
        if swa_preds is not None:
            preds = np.stack([swa_preds[m] for m in idx])
            record["val_swa"] = {
                "metric": metric, "epochs_averaged": state.n_averaged,
                "ensemble": score(fold_targets, aggregate(preds, aggregation),
                                  cfg.task_type)[metric],
                "members": [score(fold_targets, pred, cfg.task_type)[metric]
                            for pred in preds]}
        if len(state.val_curve_preds) > 1:
            curve = np.stack([np.stack([preds[m] for m in idx])
                              for _, preds in state.val_curve_preds])
            choice = epoch_choice_validation(
                curve, [epoch for epoch, _ in state.val_curve_preds], fold_targets,
                cfg.task_type, aggregation)
            if choice:
                record["val_epoch_choice"] = choice


def fold_results(fold: int, members: Sequence[Any], member_preds: Sequence[np.ndarray],
                 test_df: pd.DataFrame, test_ok: np.ndarray, rows: pd.DataFrame,
                 task_type: str, aggregation: str = "mean",
                 threshold: float | None = None, live: Sequence[int] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fold's (scores entry, predictions entry) from its members' test
    predictions: the ensemble's prediction (the `live` members', default all:
    their mean or median; classification: of the class-1 probabilities, then the
    label at `threshold`), their spread, and each member's scores (those left out
    marked `collapsed`). Test rows without an input get the training mean (or
    majority class)."""
    from mat_bench.training import score

    threshold = CLASS_THRESHOLD if threshold is None else threshold
    targets = test_df.target.to_numpy()
    preds = np.empty((len(members), len(test_df)))
    for m, (member, pred) in enumerate(zip(members, member_preds, strict=True)):
        preds[m, test_ok] = pred
        fit_mean = rows.target.iloc[member.fit_idx].mean()
        preds[m, ~test_ok] = (fit_mean if task_type == "regression"
                              else float(fit_mean > CLASS_THRESHOLD))
    if not np.isfinite(preds).all():
        raise UserError(f"training diverged: fold {fold}'s test predictions are not "
                        "all finite; try a lower --learning-rate")
    live = list(range(len(members))) if live is None else list(live)
    ensemble = aggregate(preds[live], aggregation)
    scores = score(targets, ensemble, task_type, threshold)
    entry: dict[str, Any] = {**scores, "ensemble": len(live)}
    if task_type == "classification":
        entry["threshold"] = threshold  # of the labels
    if len(members) > 1:
        entry["members"] = [{"seed": member.seed,
                             **score(targets, pred, task_type, threshold),
                             **({} if m in live else {"collapsed": True})}
                            for m, (member, pred) in enumerate(zip(members, preds,
                                                                   strict=True))]
    preds_entry: dict[str, Any] = {"mbid": list(test_df.index),
                                   "target": targets.tolist()}
    if task_type == "classification":
        preds_entry["prediction"] = (ensemble > threshold).astype(int).tolist()
        preds_entry["probability"] = ensemble.tolist()
        spread_key = "probability_std"
    else:
        preds_entry["prediction"] = ensemble.tolist()
        spread_key = "prediction_std"
    if len(live) > 1:
        preds_entry[spread_key] = preds[live].std(axis=0).tolist()
    return entry, preds_entry


def check_request(model: str, task: str, folds: Sequence[int], ensemble: int,
                  run_name: str | None, out_dir: Path, device: str | None,
                  wandb: str, checkpoint: str, hyperparams: dict[str, Any]
                  ) -> tuple[dict[str, Any], str]:
    """Step 1, before anything is loaded or written: UserError for any argument a
    run cannot take, or a results file it could not merge into (unreadable, or
    holding this task's folds at another recipe). Returns the run's
    hyperparameters (the task's defaults completed: runs.with_task_defaults) and its
    name."""
    hyperparams = {RENAMED.get(key, key): value for key, value in hyperparams.items()}
    unknown = set(hyperparams) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown hyperparameters: {sorted(unknown)}")
    params = with_task_defaults(hyperparams, model, task)
    params["embedding_aggregations"] = tuple(params["embedding_aggregations"])
    check_folds(folds, ensemble)
    for fold in folds:
        check_args(model, task, fold, params, wandb, checkpoint)
    check_device(device)
    run_name = default_run_name(model) if run_name is None else run_name
    check_run_name(run_name)
    check_out_dir(out_dir)
    for path in (scores_path(out_dir, run_name), preds_path(out_dir, run_name, task)):
        read_json_results(path)  # refuse unreadable files before training
    check_same_recipe(scores_path(out_dir, run_name), model, task, params, ensemble)
    return params, run_name


def open_device(device: str | None, model: str, cuda_graphs: bool) -> Any:
    """The torch device to train on (None: a CUDA GPU if torch sees one, else the
    CPU); UserError if this machine lacks it or it cannot take CUDA graphs."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device} but torch sees {torch.cuda.device_count()} "
                        f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}: "
                        "choose one of those")
    dev = torch.device(device)
    if cuda_graphs and (dev.type != "cuda" or model != "roostformer"):
        raise UserError("--cuda-graphs needs --device cuda and --model roostformer: "
                        "drop --cuda-graphs")
    return dev


def task_data(model: str, task: str, rows: pd.DataFrame, input_col: str,
              dev: Any) -> Any:
    """The rows' tokens and targets on the device (training.TaskData); UserError,
    naming the command that rebuilds the file, for an input the model cannot read."""
    from mat_bench.training import TaskData, tokenize

    classify = TASK_INFO[task].task_type == "classification"
    try:
        tokens = tokenize(model, list(rows[input_col]))
    except ValueError as exc:
        raise UserError(f"{task}'s featurized file holds an input {model} cannot "
                        f"read: {exc}; rebuild it with `python featurize_matbench.py "
                        f"--tasks {task} --force`") from exc
    targets = rows.target.to_numpy().astype(np.int64 if classify else np.float32)
    return TaskData(tokens, targets, dev)


def train_config(params: dict[str, Any], task_type: str, dev: Any,
                 cuda_graphs: bool) -> Any:
    """The run's training.TrainConfig; warns where --amp would be slow."""
    from mat_bench.training import TrainConfig, cpu_has_fast_bf16

    cfg = TrainConfig(
        task_type=task_type, epochs=params["epochs"], batch_size=params["batch_size"],
        learning_rate=params["learning_rate"], weight_decay=params["weight_decay"],
        warmup_frac=params["warmup_frac"], robust=params["robust"],
        gate=params["gate"] and task_type == "regression",
        log_target=params["log_target"] and task_type == "regression",
        frac_jitter=params["frac_jitter"], epoch_choice=params["epoch_choice"],
        amp=dev.type == "cuda" if params["amp"] is None else params["amp"],
        cuda_graphs=cuda_graphs,
    )
    if cfg.amp and dev.type == "cpu" and not cpu_has_fast_bf16():
        print("warning: this CPU has no native bf16 (AVX-512 or ARM bf16), so --amp "
              "will train slower than fp32: drop --amp", file=sys.stderr, flush=True)
    return cfg


def describe_run(model: str, task: str, folds: Sequence[int], ensemble: int,
                 run_name: str, params: dict[str, Any], dev: Any, cuda_graphs: bool,
                 state: Any) -> dict[str, Any]:
    """What each fold's scores entry (and W&B) records of the run: its arguments,
    hyperparameters, machine, code and SLURM job."""
    import torch

    slurm = {var.lower(): os.environ[var] for var in SLURM_VARS if var in os.environ}
    return {
        "model": model, "task": task, "folds": list(folds), "ensemble": ensemble,
        "run_name": run_name, **params,
        "embedding_aggregations": list(params["embedding_aggregations"]),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cuda_graphs": cuda_graphs, "stacked_members": len(state.members),
        "n_params": sum(p.numel() for p in state.model.parameters())
        // len(state.members),
        "hostname": socket.gethostname(), "platform": platform.platform(),
        "torch_version": torch.__version__, "git_commit": git_commit(), **slurm,
    }


def samples_per_second(state: Any) -> float:
    """Training samples per second of the stacked run, all members together."""
    n_samples = state.epoch * sum(len(m.fit_idx) for m in state.members)
    return n_samples / max(state.train_seconds, 1e-9)


def test_and_record(state: Any, data: Any, cfg: Any, df: pd.DataFrame,
                    rows: pd.DataFrame, input_col: str,
                    fold_ids: dict[int, tuple[Any, Any]], aggregation: str,
                    labels_at: dict[int, float], validation: dict[int, dict[str, Any]],
                    live: dict[int, list[int]], run_params: dict[str, Any],
                    prep_seconds: float, preds_file: Path, scores_file: Path
                    ) -> dict[int, dict[str, Any]]:
    """Step 7: predict each fold's test set with its members, and merge each fold's
    predictions and scores entry (the ensemble of its `live` members and every
    member, validation, learning curves, timings, run parameters) into the run's
    files; a fold without live members is not recorded. Returns the entries."""
    from mat_bench.training import predict

    members = state.members
    position = pd.Series(np.arange(len(rows)), index=rows.index)
    test_dfs = {fold: df.loc[test_ids] for fold, (_, test_ids) in fold_ids.items()}
    test_ok = {fold: test_df[input_col].notna().to_numpy()
               for fold, test_df in test_dfs.items()}
    test_rows = {fold: position.loc[test_df.index[test_ok[fold]]].to_numpy()
                 for fold, test_df in test_dfs.items()}
    member_preds = predict(state, data, [test_rows[m.fold] for m in members], cfg)
    entries = {}
    for fold, test_df in test_dfs.items():
        if not live[fold]:
            continue
        idx = [m for m, member in enumerate(members) if member.fold == fold]
        val = validation.get(fold, {})
        entry, preds_entry = fold_results(
            fold, [members[m] for m in idx], [member_preds[m] for m in idx], test_df,
            test_ok[fold], rows, cfg.task_type, aggregation,
            val.get("threshold", labels_at[fold]), [idx.index(m) for m in live[fold]])
        for member, val_score in zip(entry.get("members", []),
                                     val.pop("val_members", []), strict=True):
            member["val"] = val_score
        entry.update(val)
        if state.val_curve:  # each member's validation score every 10 epochs
            entry["val_curve"] = {
                "epochs": [epoch for epoch, _ in state.val_curve],
                "members": [[float(f"{scores[m]:.5g}") for _, scores in state.val_curve]
                            for m in idx]}
        if cfg.epoch_choice and state.chosen_epochs:  # chosen on validation
            entry["epochs_chosen"] = [state.chosen_epochs[m] for m in idx]
        if len(live[fold]) < len(idx):  # the seeds left out of the ensemble
            entry["collapsed_seeds"] = [members[m].seed for m in idx
                                        if m not in live[fold]]
        entry.update({
            "aggregation": aggregation,  # of the members' predictions
            "n_train": len(members[idx[0]].fit_idx),
            "n_val": len(members[idx[0]].val_idx), "n_test": len(test_df),
            "n_test_unlabelled": int((~test_ok[fold]).sum()), "epochs": state.epoch,
            "train_seconds": round(state.train_seconds, 2),  # of the stacked run
            "prep_seconds": round(prep_seconds, 2),
            "samples_per_sec": round(samples_per_second(state), 1),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "params": run_params,
        })
        merge_fold_results(preds_file, scores_file, run_params["task"],
                           {fold: (preds_entry, entry)})
        entries[fold] = entry
    return entries


def run_matbench(
    model: str,
    task: str,
    folds: int | Sequence[int],
    *,
    ensemble: int = 1,
    run_name: str | None = None,
    out_dir: str | os.PathLike = ROOT,
    device: str | None = None,
    cuda_graphs: bool = False,
    wandb: str = "disabled",
    wandb_project: str = "matbench",
    wandb_entity: str | None = None,
    checkpoint: str = "none",
    progress: bool = True,
    **hyperparams: Any,
) -> dict[int, dict[str, Any]]:
    """Train `model` on the training folds of `task`, `ensemble` members per fold (all
    stacked into one model on the device), test each fold's ensemble on its test
    fold, merge predictions and scores into OUT_DIR/model_preds/RUN/TASK.json.gz and
    OUT_DIR/model_scores/RUN.json and return the scores entry of each fold.
    Hyperparameters not given take the task's defaults (runs.task_defaults)."""
    # 1. arguments, before anything is loaded or written
    folds = [folds] if isinstance(folds, int) else list(folds)
    out_dir = Path(out_dir)
    params, run_name = check_request(model, task, folds, ensemble, run_name, out_dir,
                                     device, wandb, checkpoint, hyperparams)
    scores_file, preds_file = (scores_path(out_dir, run_name),
                               preds_path(out_dir, run_name, task))

    # 2. data: the task's rows, each member's training and validation split
    df, input_col, fold_ids = load_task(model, task, folds)
    task_type = TASK_INFO[task].task_type
    if params["log_target"] and task_type == "regression":
        check_log_target(task, df["target"])
    members, rows = split_members(df, input_col, fold_ids, ensemble, params["seed"],
                                  params["val_fraction"])
    dev = open_device(device, model, cuda_graphs)
    t_start = time.perf_counter()
    data = task_data(model, task, rows, input_col, dev)
    prep_seconds = time.perf_counter() - t_start

    # 3. model and optimizer state (every member stacked), and what the run records
    import torch

    from mat_bench.training import new_train_state

    cfg = train_config(params, task_type, dev, cuda_graphs)
    state = new_train_state(model, data, members, cfg,
                            **{key: params[key] for key in MODEL_KEYS})
    torch.manual_seed(params["seed"])  # dropout
    ckpt_path = checkpoint_path(out_dir, run_name, task, folds, ensemble)
    ckpt_meta = {"model": model, "task": task, "params": params,
                 "members": [(m.fold, m.seed) for m in members]}
    if checkpoint == "local":
        check_checkpoint_space(ckpt_path, state, cfg.epoch_choice)
    run_params = describe_run(model, task, folds, ensemble, run_name, params, dev,
                              cuda_graphs, state)

    # 4. resume, then train (one process per checkpoint; W&B only once it holds it),
    # checkpointing every 10 epochs (2 minutes at least); Ctrl-C and SIGTERM stop
    # cleanly. The results below are the same whoever writes them.
    with training_lock(ckpt_path if checkpoint == "local" else None):
        if checkpoint == "local" and ckpt_path.is_file():
            resume_from_checkpoint(ckpt_path, state, ckpt_meta)
            print(f"resuming {task} {fold_tag(folds)} from epoch {state.epoch} "
                  f"({ckpt_path})", flush=True)
        wandb_run = setup_wandb(wandb, wandb_project, wandb_entity,
                                f"{run_name}-{task}-{fold_tag(folds)}", run_params,
                                out_dir)
        train_or_stop(state, data, cfg, ckpt_path=ckpt_path if checkpoint == "local"
                      else None, ckpt_meta=ckpt_meta, wandb_run=wandb_run,
                      progress=progress)
    if cfg.epoch_choice:  # from here on each member predicts at its chosen epoch
        from mat_bench.training import use_chosen_epochs

        use_chosen_epochs(state)

    # 5. each fold's ensemble on its validation split: the label threshold is
    # chosen here, never on the test fold
    aggregation = (AUTO_AGGREGATION[task_type] if params["ensemble_aggregation"]
                   == "auto" else params["ensemble_aggregation"])
    labels_at, validation, live = validate_folds(
        state, data, cfg, members, rows.target.to_numpy(), aggregation, params)

    # 6. test each fold's ensemble and write its results
    entries = test_and_record(state, data, cfg, df, rows, input_col, fold_ids,
                              aggregation, labels_at, validation, live, run_params,
                              prep_seconds, preds_file, scores_file)
    metric = TASK_INFO[task].metric
    for fold, entry in entries.items():
        of = f" (ensemble of {entry['ensemble']})" if ensemble > 1 else ""
        print(f"{model} {task} fold {fold}: test {metric} = {entry[metric]:.4g}{of}",
              flush=True)
    print(f"{len(members)} members, {state.epoch} epochs in "
          f"{state.train_seconds:.1f} s ({samples_per_second(state):,.0f} training "
          f"samples/s) -> {scores_file}", flush=True)
    if wandb_run is not None:
        wandb_run.summary.update({f"test_{k}_fold_{fold}": entry[k]
                                  for fold, entry in entries.items()
                                  for k in ("mae", "rmse", "r2", "rocauc",
                                            "rocauc_prob", "accuracy", "f1")
                                  if k in entry})
        wandb_run.finish()
    if lost := [fold for fold in folds if not live[fold]]:
        raise UserError(f"fold(s) {lost} not recorded: every member's training "
                        "collapsed (each predicts one value for every material). "
                        "Rerun under a new --run-name with a lower --learning-rate "
                        "or another --seed")
    return entries


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of device memory (CUDA) or host memory."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    stop_when_parent_dies()
    args = vars(build_run_parser(__doc__).parse_args(argv))
    fold, folds = args.pop("fold"), args.pop("folds")
    fixed = {"model": args.pop("model"), "task": args.pop("task"),
             "folds": [fold] if folds is None else folds}
    args["progress"] = not args.pop("no_progress")
    try:
        run_matbench(**fixed, **args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        # the first epoch's steps and validation reach the run's peak, so this
        # costs at most one epoch; the results files are not touched
        members = len(fixed["folds"]) * args["ensemble"]
        print(f"error: out of memory training {members} member(s) at --batch-size "
              f"{args['batch_size']}: stack fewer "
              "(fewer --folds, a smaller --ensemble; run_folds.py without "
              "--per-task) or lower --batch-size", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C before or after training
        print("stopped by SIGINT (Ctrl-C); no results written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
