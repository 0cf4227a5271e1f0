"""Train and test Roostformer or Wrenformer on one Matbench task and fold.

Examples:
    python run_matbench.py --model roostformer --task matbench_expt_gap --fold 0
    python run_matbench.py --model wrenformer --task matbench_phonons --fold 3 \
        --epochs 300 --run-name wrenformer-phonons --wandb offline
    python run_matbench.py --model roostformer --task matbench_steels --fold 0 \
        --frac-encoding 0 --device cuda --checkpoint local

The test fold's predictions go to OUT_DIR/model_preds/RUN.json and its scores to
OUT_DIR/model_scores/RUN.json, merged under a file lock so that many jobs of one run
can write at once. Folds are Matbench v0.1's own; the normalizer is fitted on the
training fold; a validation split of the training fold (--val-fraction) is only
watched, never used to pick a model: the final epoch's model is tested.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mat_bench import ROOT, STRUCTURE_TASKS, TASK_INFO
from mat_bench.data import (
    UserError,
    atomic_path,
    check_fold,
    check_task,
    get_fold_ids,
    load_featurized,
    merge_fold_result,
    read_json_results,
)

MODELS = ("roostformer", "wrenformer")
# defaults in one place: the hyperparameters used for every committed result
DEFAULTS: dict[str, Any] = {
    "epochs": 300,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "weight_decay": 1e-2,
    "warmup_frac": 0.05,
    "n_attn_layers": 3,
    "d_model": 128,
    "n_heads": 4,
    "dropout": 0.0,
    "embedding_aggregations": ("mean",),
    "frac_encoding": 64,  # dims of the sinusoidal fraction encoding, 0 = off
    "robust": False,
    "val_fraction": 0.1,
    "seed": 0,
    "amp": None,  # bf16 compute, fp32 master weights: None = on for CUDA, off for CPU
}
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def default_run_name(model: str) -> str:
    return f"{model}-{datetime.datetime.now():%Y-%m-%d@%H-%M}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_args(model: str, task: str, fold: int, params: dict[str, Any],
               wandb_mode: str, checkpoint: str) -> None:
    """Raise UserError for any bad argument, before anything is loaded or written."""
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: use roostformer or wrenformer")
    check_task(task)
    check_fold(fold)
    if model == "wrenformer" and task not in STRUCTURE_TASKS:
        raise UserError(
            f"wrenformer needs crystal structures but {task} is a composition-only "
            "task: use --model roostformer"
        )
    for key in ("epochs", "batch_size", "n_attn_layers", "d_model", "n_heads"):
        if params[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, "
                            f"got {params[key]}")
    if params["d_model"] % params["n_heads"]:
        raise UserError(f"--d-model {params['d_model']} must be divisible by "
                        f"--n-heads {params['n_heads']}")
    if not 0 <= params["val_fraction"] < 0.5:
        raise UserError("--val-fraction must be in [0, 0.5)")
    if params["learning_rate"] <= 0:
        raise UserError("--learning-rate must be positive")
    if params["frac_encoding"] < 0 or params["frac_encoding"] % 4:
        raise UserError("--frac-encoding must be 0 or a positive multiple of 4")
    bad_aggs = set(params["embedding_aggregations"]) - {"mean", "std", "sum", "min",
                                                         "max"}
    if bad_aggs or not params["embedding_aggregations"]:
        raise UserError("--embedding-aggregations takes one or more of mean std sum "
                        f"min max, got {list(params['embedding_aggregations'])}")
    if wandb_mode not in ("disabled", "offline", "online"):
        raise UserError("--wandb must be disabled, offline or online")
    if checkpoint not in ("none", "local"):
        raise UserError("--checkpoint must be none or local")


def load_fold(model: str, task: str, fold: int) -> tuple[Any, Any, Any]:
    """The task's featurized rows for the fold's training and test ids, as
    (train_df, test_df, inputs column)."""
    df = load_featurized(task)
    train_ids, test_ids = get_fold_ids(task, fold)
    missing = set(train_ids).union(test_ids).difference(df.index)
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
    return df.loc[train_ids], df.loc[test_ids], col


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


def run_matbench(
    model: str,
    task: str,
    fold: int,
    *,
    run_name: str | None = None,
    out_dir: str | os.PathLike = ROOT,
    device: str | None = None,
    wandb: str = "disabled",
    wandb_project: str = "matbench",
    wandb_entity: str | None = None,
    checkpoint: str = "none",
    progress: bool = True,
    **hyperparams: Any,
) -> dict[str, Any]:
    """Train `model` on the training fold of `task`, test it on the test fold, merge
    predictions and scores into OUT_DIR/model_{preds,scores}/RUN.json and return the
    scores entry. Hyperparameters not given take DEFAULTS."""
    unknown = set(hyperparams) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown hyperparameters: {sorted(unknown)}")
    params = {**DEFAULTS, **hyperparams}
    params["embedding_aggregations"] = tuple(params["embedding_aggregations"])
    check_args(model, task, fold, params, wandb, checkpoint)
    run_name = run_name or default_run_name(model)
    out_dir = Path(out_dir)
    scores_path = out_dir / "model_scores" / f"{run_name}.json"
    preds_path = out_dir / "model_preds" / f"{run_name}.json"
    for path in (scores_path, preds_path):  # refuse unreadable files before training
        read_json_results(path)
    train_df, test_df, input_col = load_fold(model, task, fold)

    import torch

    from mat_bench.training import (
        DeviceData,
        TrainConfig,
        cpu_has_fast_bf16,
        new_train_state,
        predict,
        score,
        tokenize,
        train,
    )

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    dev = torch.device(device)
    task_type = TASK_INFO[task][1]
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])

    # rows without a Wyckoff label cannot be read by Wrenformer: train without them,
    # predict the training mean (or majority class) for them, and count them
    has_input = lambda df: df[input_col].notna().to_numpy()  # noqa: E731
    train_df = train_df[has_input(train_df)]
    test_ok = has_input(test_df)
    n_val = int(round(params["val_fraction"] * len(train_df)))
    perm = rng.permutation(len(train_df))
    val_df, fit_df = train_df.iloc[perm[:n_val]], train_df.iloc[perm[n_val:]]

    t_start = time.perf_counter()
    target_dtype = np.int64 if task_type == "classification" else np.float32
    splits = {"fit": fit_df, "val": val_df, "test": test_df[test_ok]}
    tokens = tokenize(model, list(np.concatenate([df[input_col] for df in splits.values()])))
    datasets, offset = {}, 0
    for name, df in splits.items():
        idx = np.arange(offset, offset + len(df))
        offset += len(df)
        datasets[name] = DeviceData(
            tokens.subset(idx), df.target.to_numpy().astype(target_dtype), dev,
            params["batch_size"] if name == "fit" else max(512, params["batch_size"]))
    fit_data, val_data, test_data = datasets["fit"], datasets["val"], datasets["test"]
    prep_seconds = time.perf_counter() - t_start

    cfg = TrainConfig(
        task_type=task_type, epochs=params["epochs"],
        learning_rate=params["learning_rate"], weight_decay=params["weight_decay"],
        warmup_frac=params["warmup_frac"], robust=params["robust"],
        amp=dev.type == "cuda" if params["amp"] is None else params["amp"],
        seed=params["seed"],
    )
    if cfg.amp and dev.type == "cpu" and not cpu_has_fast_bf16():
        print("warning: this CPU has no native bf16 (AVX-512 or ARM bf16), so --amp "
              "will train slower than fp32: drop --amp", file=sys.stderr, flush=True)
    state = new_train_state(
        model, fit_data, cfg, frac_encoding_dims=params["frac_encoding"],
        d_model=params["d_model"], n_attn_layers=params["n_attn_layers"],
        n_attn_heads=params["n_heads"], dropout=params["dropout"],
        embedding_aggregations=params["embedding_aggregations"],
    )
    net, optimizer, scheduler, normalizer = (state.model, state.optimizer,
                                             state.scheduler, state.normalizer)

    ckpt_path = out_dir / "checkpoints" / run_name / f"{task}-fold_{fold}.pt"
    if checkpoint == "local" and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if saved["params"] != params or saved["model"] != model:
            raise UserError(f"checkpoint {ckpt_path} was made with other "
                            "hyperparameters: delete it or use another --run-name")
        net.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        scheduler.load_state_dict(saved["scheduler_state"])
        normalizer.load_state_dict(saved["normalizer"])
        normalizer.mean, normalizer.std = (normalizer.mean.to(dev),
                                           normalizer.std.to(dev))
        state.epoch, state.train_seconds = saved["epoch"], saved["train_seconds"]
        print(f"resuming {task} fold {fold} from epoch {state.epoch} ({ckpt_path})",
              flush=True)

    def save_checkpoint() -> None:
        with atomic_path(ckpt_path) as tmp:
            torch.save({
                "model": model, "task": task, "fold": fold, "params": params,
                "model_params": net.model_params,
                "model_state": net.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "normalizer": {k: v.cpu() for k, v in normalizer.state_dict().items()},
                "epoch": state.epoch, "train_seconds": state.train_seconds,
            }, tmp)

    slurm = {var.lower(): os.environ[var] for var in SLURM_VARS if var in os.environ}
    run_params = {
        "model": model, "task": task, "fold": fold, "run_name": run_name, **params,
        "embedding_aggregations": list(params["embedding_aggregations"]),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "n_params": sum(p.numel() for p in net.parameters()),
        "hostname": socket.gethostname(), "platform": platform.platform(),
        "torch_version": torch.__version__, "git_commit": git_commit(), **slurm,
    }
    wandb_run = setup_wandb(wandb, wandb_project, wandb_entity,
                            f"{run_name}-{task}-fold_{fold}", run_params, out_dir)

    # SIGTERM (SLURM time limit, preemption): checkpoint after this epoch and exit
    stop_requested = []
    previous_handler = None
    if checkpoint == "local":
        previous_handler = signal.signal(
            signal.SIGTERM, lambda *_: stop_requested.append(True))

    last_metrics: dict[str, float] = {}

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> bool:
        last_metrics.update(metrics)
        if wandb_run is not None:
            wandb_run.log({"epoch": epoch, **metrics})
        if checkpoint == "local" and (stop_requested or epoch % 10 == 0
                                      or epoch == cfg.epochs):
            save_checkpoint()
        return bool(stop_requested)

    try:
        train(state, fit_data, val_data, cfg, on_epoch_end=on_epoch_end,
              progress=progress)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if stop_requested:
        if wandb_run is not None:
            wandb_run.finish(exit_code=143)
        raise SystemExit(f"stopped by SIGTERM after epoch {state.epoch}: checkpoint "
                         f"saved to {ckpt_path}; rerun the same command to resume")

    test_preds = np.empty(len(test_df))
    test_preds[test_ok] = predict(net, test_data, cfg, normalizer)
    targets = test_df.target.to_numpy()
    if not test_ok.all():
        fallback = (fit_df.target.mean() if task_type == "regression"
                    else float(fit_df.target.mean() >= 0.5))
        test_preds[~test_ok] = fallback
    test_scores = score(targets, test_preds, task_type)
    if not np.isfinite(list(test_scores.values())).all():
        raise RuntimeError(f"non-finite test scores {test_scores}: training diverged "
                           "(try a lower --learning-rate)")
    n_samples = state.epoch * len(fit_data)  # resumed runs: seconds are totals too
    entry = {
        **test_scores,
        **{k: v for k, v in last_metrics.items() if k.startswith("val_")},
        "n_train": len(fit_data), "n_val": len(val_data), "n_test": len(test_df),
        "n_test_unlabelled": int((~test_ok).sum()),
        "epochs": state.epoch,
        "train_seconds": round(state.train_seconds, 2),
        "prep_seconds": round(prep_seconds, 2),
        "samples_per_sec": round(n_samples / max(state.train_seconds, 1e-9), 1),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": run_params,
    }
    preds_entry: dict[str, Any] = {"mbid": list(test_df.index),
                                   "target": targets.tolist()}
    if task_type == "classification":
        preds_entry["prediction"] = (test_preds >= 0.5).astype(int).tolist()
        preds_entry["probability"] = test_preds.tolist()
    else:
        preds_entry["prediction"] = test_preds.tolist()
    merge_fold_result(preds_path, task, fold, preds_entry)
    merge_fold_result(scores_path, task, fold, entry)

    if wandb_run is not None:
        wandb_run.summary.update({f"test_{k}": v for k, v in test_scores.items()})
        wandb_run.finish()
    metric = "mae" if task_type == "regression" else "rocauc"
    print(f"{model} {task} fold {fold}: test {metric} = {test_scores[metric]:.4g} "
          f"({state.epoch} epochs in {state.train_seconds:.1f} s, "
          f"{entry['samples_per_sec']:,.0f} training samples/s) -> {scores_path}",
          flush=True)
    return entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--task", required=True, help="a Matbench v0.1 task name")
    parser.add_argument("--fold", required=True, type=int, help="0 to 4")
    hyper = parser.add_argument_group("hyperparameters (defaults: DEFAULTS)")
    for key in ("epochs", "batch_size", "n_attn_layers", "d_model", "n_heads",
                "seed", "frac_encoding"):
        hyper.add_argument(f"--{key.replace('_', '-')}", type=int, default=DEFAULTS[key])
    for key in ("learning_rate", "weight_decay", "warmup_frac", "dropout",
                "val_fraction"):
        hyper.add_argument(f"--{key.replace('_', '-')}", type=float,
                           default=DEFAULTS[key])
    hyper.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 compute with fp32 master weights: autocast on CUDA, "
                       "a bf16 copy of the model on a CPU (default: on for CUDA, "
                       "off for CPU)")
    hyper.add_argument("--robust", action="store_true",
                       help="aviary's robust L1 loss with a learned uncertainty")
    hyper.add_argument("--embedding-aggregations", nargs="+",
                       default=list(DEFAULTS["embedding_aggregations"]),
                       help="pooling of the transformer output: mean std sum min max")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda "
                        "if available)")
    parser.add_argument("--run-name", default=None, help="results file name (default: "
                        "model and timestamp); jobs sharing it share the files")
    parser.add_argument("--out-dir", default=ROOT,
                        help="folder holding model_scores/ and model_preds/")
    parser.add_argument("--wandb", default="disabled",
                        choices=["disabled", "offline", "online"])
    parser.add_argument("--wandb-project", default="matbench")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--checkpoint", default="none", choices=["none", "local"],
                        help="local: save OUT_DIR/checkpoints/RUN/TASK-fold_F.pt every "
                        "10 epochs and on SIGTERM, and resume from it")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fixed = {key: args.pop(key) for key in ("model", "task", "fold")}
    args["progress"] = not args.pop("no_progress")
    try:
        run_matbench(**fixed, **args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
