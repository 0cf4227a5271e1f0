"""run_matbench.py on real Matbench data: both models, the result files, stacked
folds and ensembles, checkpoints and signals, W&B, and every bad input caught
before training with one clear line."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import mat_bench.training as training
from mat_bench import DATA_PATHS
from mat_bench.data import (
    UserError,
    get_fold_ids,
    load_featurized,
    merge_fold_result,
    preds_file,
    read_json_results,
)
from mat_bench.run_matbench import (
    aggregate,
    epoch_choice_validation,
    fold_validation,
    run_matbench,
    split_members,
)
from mat_bench.run_matbench import main as run_main

REPO = Path(__file__).resolve().parent.parent
TINY = {"d_model": 32, "n_attn_heads": 2, "n_attn_layers": 1}  # fast, for plumbing


# --- training and result files ------------------------------------------------------
def check_fold_files(out_dir, run, task, fold, metric, n_test):
    scores = read_json_results(out_dir / "model_scores" / f"{run}.json")
    preds = read_json_results(preds_file(out_dir / "model_preds", run, task))
    entry = scores[task][f"fold_{fold}"]
    assert math.isfinite(entry[metric])
    assert entry["n_test"] == n_test and entry["params"]["run_name"] == run
    fold_preds = preds[task][f"fold_{fold}"]
    assert fold_preds["mbid"] == get_fold_ids(task, fold)[1]
    assert len(fold_preds["prediction"]) == len(fold_preds["target"]) == n_test
    assert np.isfinite(fold_preds["prediction"]).all()
    return entry, fold_preds


def test_roostformer_regression_and_classification(featurized, tmp_path):
    featurized("matbench_steels", "matbench_expt_is_metal")
    entry = run_matbench("roostformer", "matbench_steels", 1, epochs=2,
                         run_name="roost", out_dir=tmp_path, progress=False)[1]
    assert entry["epochs"] == 2 and entry["params"]["model"] == "roostformer"
    _, preds = check_fold_files(tmp_path, "roost", "matbench_steels", 1, "mae", 63)
    assert set(entry) >= {"mae", "rmse", "r2", "train_seconds", "samples_per_sec"}
    # the reported MAE is the MAE of the recorded predictions
    err = np.array(preds["prediction"]) - np.array(preds["target"])
    assert entry["mae"] == pytest.approx(np.abs(err).mean())

    entry = run_matbench("roostformer", "matbench_expt_is_metal", 0, epochs=1,
                         run_name="roost", out_dir=tmp_path, progress=False, **TINY)[0]
    _, preds = check_fold_files(tmp_path, "roost", "matbench_expt_is_metal", 0,
                                "rocauc", 985)
    assert 0 <= min(preds["probability"]) and max(preds["probability"]) <= 1
    assert set(preds["prediction"]) <= {0, 1} and set(preds["target"]) == {0, 1}
    # both tasks live in the same run files
    assert set(read_json_results(tmp_path / "model_scores" / "roost.json")) == {
        "matbench_steels", "matbench_expt_is_metal"}


def test_wrenformer_phonons(featurized, tmp_path):
    featurized("matbench_phonons")
    entry = run_matbench("wrenformer", "matbench_phonons", 2, epochs=2,
                         run_name="wren", out_dir=tmp_path, progress=False)[2]
    check_fold_files(tmp_path, "wren", "matbench_phonons", 2, "mae", 253)
    assert entry["params"]["model"] == "wrenformer" and entry["n_test_unlabelled"] == 0


def test_cli_prints_score_and_exits_zero(featurized, tmp_path):
    featurized("matbench_steels")
    proc = subprocess.run(
        [sys.executable, "run_matbench.py", "--model", "roostformer", "--task",
         "matbench_steels", "--fold", "4", "--epochs", "1", "--run-name", "cli",
         "--out-dir", str(tmp_path), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test mae =" in proc.stdout
    check_fold_files(tmp_path, "cli", "matbench_steels", 4, "mae", 62)


def test_amp_on_a_cpu_without_native_bf16_warns(featurized, tmp_path, capsys,
                                                monkeypatch):
    import mat_bench.training as training

    featurized("matbench_steels")
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)
    run_matbench("roostformer", "matbench_steels", 0, epochs=1, run_name="slow",
                 out_dir=tmp_path, progress=False, amp=True, **TINY)
    err = capsys.readouterr().err
    assert "no native bf16" in err and "drop --amp" in err
    run_matbench("roostformer", "matbench_steels", 1, epochs=1, run_name="slow",
                 out_dir=tmp_path, progress=False, amp=False, **TINY)
    assert "bf16" not in capsys.readouterr().err


@pytest.mark.parametrize("amp", [False, True])  # on a CPU, amp trains a Bf16Copy
def test_checkpoint_predicts_again(featurized, tmp_path, amp):
    """A stacked run's checkpoint holds every member: rebuilt from it, the members
    predict the recorded ensemble mean of each fold."""
    import torch

    from mat_bench.training import (
        MatbenchTransformer,
        StackedTransformer,
        TaskData,
        TrainConfig,
        TrainState,
        predict,
        tokenize_compositions,
    )

    featurized("matbench_steels")
    run_matbench("roostformer", "matbench_steels", [0, 3], ensemble=2, epochs=3,
                 run_name="ck", out_dir=tmp_path, checkpoint="local", progress=False,
                 amp=amp, dim_feedforward=64, **TINY)
    saved = torch.load(tmp_path / "checkpoints" / "ck"
                       / "matbench_steels-folds_0-3-ensemble_2.pt", weights_only=False)
    assert saved["epoch"] == 3 and saved["members"] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert saved["model_params"]["dim_feedforward"] == 64
    model = StackedTransformer([MatbenchTransformer(**saved["model_params"])] * 4)
    model.load_state_dict(saved["model_state"])
    state = TrainState(model, [], None, None, saved["norm_mean"], saved["norm_std"])
    recorded = read_json_results(preds_file(tmp_path / "model_preds", "ck",
                                            "matbench_steels"))
    for fold, members in ((0, [0, 1]), (3, [2, 3])):
        test = load_featurized("matbench_steels").loc[
            get_fold_ids("matbench_steels", fold)[1]]
        data = TaskData(tokenize_compositions(list(test.composition)),
                        test.target.to_numpy(np.float32), torch.device("cpu"))
        preds = predict(state, data, [np.arange(len(test))] * 4,
                        TrainConfig("regression", 3, amp=amp))
        np.testing.assert_allclose(
            np.mean([preds[m] for m in members], axis=0),
            recorded["matbench_steels"][f"fold_{fold}"]["prediction"], rtol=1e-4)


def test_stacked_folds_and_ensembles_write_each_fold(featurized, tmp_path):
    """--folds F.. --ensemble E: each fold's prediction aggregates its members'
    (auto: their median for regression, their mean probability for classification),
    with their spread; its scores hold the ensemble's metrics and each member's."""
    featurized("matbench_steels", "matbench_expt_is_metal")
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--folds",
                     "1", "4", "--ensemble", "3", "--epochs", "2", "--out-dir",
                     str(tmp_path), "--run-name", "ens", "--no-progress", "--d-model",
                     "32", "--n-attn-heads", "2", "--n-attn-layers", "1"])
    assert code == 0
    for fold, n_test in ((1, 63), (4, 62)):
        entry, preds = check_fold_files(tmp_path, "ens", "matbench_steels", fold, "mae",
                                        n_test)
        assert entry["ensemble"] == 3 and entry["params"]["stacked_members"] == 6
        assert entry["aggregation"] == "median"
        assert [m["seed"] for m in entry["members"]] == [0, 1, 2]
        # the learning curve: each member's validation score (here after the last
        # epoch, as 2 < 10), ending at the member's recorded one
        curve = entry["val_curve"]
        assert curve["epochs"] == [2] and len(curve["members"]) == 3
        assert [c[-1] for c in curve["members"]] == pytest.approx(
            [m["val"] for m in entry["members"]], rel=1e-4)
        assert all(math.isfinite(m["mae"]) and math.isfinite(m["val"])
                   for m in entry["members"])
        assert len(preds["prediction_std"]) == n_test
        assert min(preds["prediction_std"]) >= 0 and max(preds["prediction_std"]) > 0
        err = np.array(preds["prediction"]) - np.array(preds["target"])
        assert entry["mae"] == pytest.approx(np.abs(err).mean())
    entries = run_matbench("roostformer", "matbench_expt_is_metal", [2], ensemble=2,
                           epochs=1, run_name="ens", out_dir=tmp_path, progress=False,
                           **TINY)
    entry, preds = check_fold_files(tmp_path, "ens", "matbench_expt_is_metal", 2,
                                    "rocauc", entries[2]["n_test"])
    # labels above the training split's share of class 1 (--prior-threshold)
    assert entry["threshold"] != 0.5 and 0.3 < entry["threshold"] < 0.7
    assert preds["prediction"] == [int(p > entry["threshold"])
                                   for p in preds["probability"]]
    assert len(preds["probability_std"]) == len(preds["probability"])
    assert len(entry["members"]) == 2
    assert {"rocauc", "rocauc_prob"} <= set(entry["members"][0])
    assert entry["aggregation"] == "mean"


def test_sigterm_checkpoints_and_rerun_resumes(featurized, tmp_path):
    featurized("matbench_steels")
    cmd = [sys.executable, "run_matbench.py", "--model", "roostformer", "--task",
           "matbench_steels", "--fold", "2", "--epochs", "60", "--run-name", "term",
           "--out-dir", str(tmp_path), "--checkpoint", "local", "--no-progress",
           "--d-model", "32", "--n-attn-heads", "2", "--n-attn-layers", "1",
           "--batch-size", "8", "--frac-jitter", "0"]
    ckpt = tmp_path / "checkpoints" / "term" / "matbench_steels-fold_2.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err
    assert not (tmp_path / "model_scores" / "term.json").exists()
    # as if saved before --gate, --frac-jitter and --wyckoff-features existed (no
    # gate, no jitter, raw features): it resumes with those off, refuses today's
    # default jitter, and compares no Wyckoff features, which Roostformer ignores
    import torch

    saved = torch.load(ckpt, weights_only=False)
    for key in ("gate", "frac_jitter", "wyckoff_features"):
        del saved["params"][key]
    torch.save(saved, ckpt)
    refused = subprocess.run(cmd[:-2], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "other hyperparameters" in refused.stderr
    proc = subprocess.run([*cmd, "--wyckoff-features", "max"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "resuming matbench_steels fold_2 from epoch" in proc.stdout
    scores = read_json_results(tmp_path / "model_scores" / "term.json")
    assert scores["matbench_steels"]["fold_2"]["epochs"] == 60
    # the validation curve survives the resume: every 10 epochs, from the start
    curve = scores["matbench_steels"]["fold_2"]["val_curve"]
    assert curve["epochs"] == [10, 20, 30, 40, 50, 60]
    assert len(curve["members"]) == 1 and all(map(math.isfinite, curve["members"][0]))
    assert curve["members"][0][-1] == pytest.approx(
        scores["matbench_steels"]["fold_2"]["val_mae"], rel=1e-4)


def test_wandb_offline_logs_locally(featurized, tmp_path, monkeypatch):
    featurized("matbench_steels")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_matbench("roostformer", "matbench_steels", 3, epochs=2, run_name="wb",
                 out_dir=tmp_path, wandb="offline", progress=False, **TINY)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # a stacked run (2 folds x 2 seeds) is one W&B run, with every fold's test score
    run_matbench("roostformer", "matbench_steels", [0, 1], ensemble=2, epochs=2,
                 run_name="wb2", out_dir=tmp_path, wandb="offline", progress=False,
                 **TINY)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    (record,) = max(runs, key=lambda p: p.name).glob("*.wandb")  # the stacked run
    # W&B's record log holds the summary's keys as text; W&B's service process may
    # still be writing it when finish() returns on a busy machine
    deadline = time.monotonic() + 60
    while not (b"test_mae_fold_0" in (logged := record.read_bytes())
               and b"test_mae_fold_1" in logged) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"test_mae_fold_0" in logged and b"test_mae_fold_1" in logged


# --- bad input: one clear line, exit 2, nothing written ------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "roostformer", "--task", "matbench_nope", "--fold", "0"],
         "unknown task 'matbench_nope'"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "5"],
         "fold 5 is out of range"),
        (["--model", "wrenformer", "--task", "matbench_steels", "--fold", "0"],
         "composition-only task"),
        (["--model", "wrenformer", "--task", "matbench_jdft2d", "--fold", "0"],
         "has no Wyckoff labels"),
        (["--model", "roostformer", "--task", "matbench_mp_gap", "--fold", "0"],
         "python featurize_matbench.py --tasks matbench_mp_gap"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
          "--epochs", "0"], "--epochs must be at least 1"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
          "--d-model", "30", "--n-attn-heads", "4"], "divisible"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
          "--dim-feedforward", "0"], "--dim-feedforward must be at least 1"),
        (["--model", "roostformer", "--task", "matbench_steels", "--folds", "0", "2",
          "0"], "repeats a fold"),
        (["--model", "roostformer", "--task", "matbench_steels", "--folds", "0", "7"],
         "fold 7 is out of range"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
          "--ensemble", "0"], "--ensemble must be at least 1"),
        (["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
          "--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    ],
)
def test_bad_input_errors(featurized, tmp_path, capsys, argv, message):
    featurized("matbench_steels", "matbench_jdft2d")
    code = run_main([*argv, "--out-dir", str(tmp_path), "--run-name", "bad"])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.json"))


def test_invalid_results_file_is_never_overwritten(featurized, tmp_path, capsys):
    featurized("matbench_steels")
    scores = tmp_path / "model_scores" / "broken.json"
    scores.parent.mkdir()
    scores.write_text('{"matbench_steels": {"fold_0": ')
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(tmp_path), "--run-name",
                     "broken"])
    assert code == 2 and "not valid JSON" in capsys.readouterr().err
    assert scores.read_text() == '{"matbench_steels": {"fold_0": '
    assert not (tmp_path / "model_preds").exists()
    with pytest.raises(UserError, match="not valid JSON"):
        merge_fold_result(scores, "matbench_steels", 1, {})


def test_package_imports_outside_repo(tmp_path):
    """Scripts import shared code as mat_bench.*, whatever the clone is named."""
    proc = subprocess.run([sys.executable, "-c", "import mat_bench.run_matbench, "
                           "mat_bench.featurize_matbench; print('ok')"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_wandb_online_without_login_says_what_to_do(featurized, tmp_path, monkeypatch,
                                                    capsys):
    featurized("matbench_steels")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--wandb", "online", "--out-dir",
                     str(tmp_path), "--run-name", "online"])
    assert code == 2 and "wandb login" in capsys.readouterr().err
    assert not list(tmp_path.rglob("online.json"))




# --- reliability: checked before training, one line, nothing written ---------------
@pytest.mark.parametrize(("flags", "message"), [
    (["--run-name", "../../x"], "must be a plain file name"),
    (["--run-name", "a/b"], "must be a plain file name"),
    (["--run-name", ""], "must be a plain file name"),
    (["--run-name", "ok", "--learning-rate", "nan"], "--learning-rate must be a fin"),
    (["--run-name", "ok", "--learning-rate", "inf"], "--learning-rate must be a fin"),
    (["--run-name", "ok", "--device", "tpu"], "--device 'tpu' is not supported"),
    (["--run-name", "ok", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--run-name", "ok", "--weight-decay", "-1"], "--weight-decay must be"),
    (["--run-name", "ok", "--seed", "-1"], "--seed must be a whole number"),
    (["--run-name", "ok", "--warmup-frac", "2"], "--warmup-frac must be in [0, 1]"),
    (["--run-name", "ok", "--embedding-aggregations", "mean", "mean"],
     "--embedding-aggregations lists one twice"),
])
def test_every_flag_is_checked_before_training(featurized, tmp_path, capsys, flags,
                                               message):
    featurized("matbench_steels")
    out = tmp_path / "out"
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.parent.glob("x.json"))


@pytest.mark.parametrize("case", ["file", "wrong_shape", "task_list"])
def test_bad_out_dir_or_results_file_is_refused_before_training(featurized, tmp_path,
                                                               capsys, case):
    featurized("matbench_steels")
    out = tmp_path / "out"
    if case == "file":
        out.write_text("not a folder")
        message = "is a file, not a folder"
    else:
        (out / "model_scores").mkdir(parents=True)
        bad = {"matbench_steels": 5} if case == "wrong_shape" else {
            "matbench_steels": [1, 2]}
        (out / "model_scores" / "R.json").write_text(json.dumps(bad))
        message = "is not a results file"
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(out), "--run-name", "R"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "model_preds").exists()


def test_diverged_training_says_so_and_writes_nothing(featurized, tmp_path, capsys):
    featurized("matbench_steels")
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "3", "--learning-rate", "1e4", "--out-dir",
                     str(tmp_path), "--run-name", "div", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and "--learning-rate" in err
    assert err.count("\n") == 1 and not list(tmp_path.rglob("*.json"))


def test_collapsed_predictions():
    assert training.collapsed(np.array([0.7, 0.7, 0.7]))
    assert not training.collapsed(np.array([0.7, 0.7, 0.70001]))
    assert not training.collapsed(np.array([0.7]))  # one material says nothing


def collapse_members(monkeypatch, dead):
    """Make the members whose (fold, seed) is in `dead` predict 1.0 for every
    material, as a member whose training collapsed does; returns the list that
    collects each predict call's (patched) member predictions."""
    original, calls = training.predict, []

    def predict(state, data, member_idx, cfg, **kwargs):
        preds = original(state, data, member_idx, cfg, **kwargs)
        preds = [np.ones_like(p) if (member.fold, member.seed) in dead else p
                 for member, p in zip(state.members, preds, strict=True)]
        calls.append(preds)
        return preds

    monkeypatch.setattr(training, "predict", predict)
    return calls


def test_collapsed_member_is_left_out_of_the_ensemble(featurized, tmp_path,
                                                      monkeypatch, capsys):
    """A member whose predictions collapsed to one value is reported as soon as
    training sees it, left out of its fold's ensemble (prediction and spread from
    the others) and marked in the scores."""
    featurized("matbench_steels")
    calls = collapse_members(monkeypatch, {(1, 0)})
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "1", "--ensemble", "3", "--epochs", "2", "--out-dir",
                     str(tmp_path), "--run-name", "col", "--no-progress",
                     "--d-model", "32", "--n-attn-heads", "2", "--n-attn-layers", "1"])
    err = capsys.readouterr().err
    assert code == 0
    assert "member 0 (fold 1, seed 0) predicts one value for every validation " \
           "material after epoch 1" in err and "left out" in err
    entry, preds = check_fold_files(tmp_path, "col", "matbench_steels", 1, "mae", 63)
    assert entry["ensemble"] == 2 and entry["collapsed_seeds"] == [0]
    assert [m.get("collapsed", False) for m in entry["members"]] == [True, False,
                                                                     False]
    test_preds = np.stack(calls[-1])  # the last predict call: the test fold
    assert np.all(test_preds[0] == 1.0)
    assert preds["prediction"] == pytest.approx(np.median(test_preds[1:], axis=0))
    assert preds["prediction_std"] == pytest.approx(test_preds[1:].std(axis=0))
    assert entry["val_by_aggregation"]["median"] == pytest.approx(entry["val_mae"])


def test_fold_whose_members_all_collapsed_is_not_recorded(featurized, tmp_path,
                                                          monkeypatch, capsys):
    """Folds stacked in one run: a fold left without a live member is not recorded
    and the run says so, while the other fold's results are written."""
    featurized("matbench_steels")
    collapse_members(monkeypatch, {(1, 0)})
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--folds",
                     "1", "4", "--epochs", "1", "--out-dir", str(tmp_path),
                     "--run-name", "col", "--no-progress", "--d-model", "32",
                     "--n-attn-heads", "2", "--n-attn-layers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(
        "fold(s) [1] not recorded: every member's training collapsed (each predicts "
        "one value for every material). Rerun under a new --run-name with a lower "
        "--learning-rate or another --seed")
    scores = read_json_results(tmp_path / "model_scores" / "col.json")
    assert list(scores["matbench_steels"]) == ["fold_4"]
    check_fold_files(tmp_path, "col", "matbench_steels", 4, "mae", 62)


@pytest.mark.parametrize("error", ["cuda", "host"])
def test_out_of_memory_says_what_to_do(featurized, tmp_path, capsys, monkeypatch,
                                       error):
    import torch

    featurized("matbench_steels")

    def out_of_memory(*_args, **_kwargs):
        if error == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 2147483648 bytes")

    monkeypatch.setattr(training, "member_losses", out_of_memory)
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--folds",
                     "0", "1", "--ensemble", "2", "--epochs", "1", "--out-dir",
                     str(tmp_path), "--run-name", "oom", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "out of memory training 4 member(s) at --batch-size 128" in err
    assert not list(tmp_path.rglob("*.json"))


def test_other_runtime_errors_are_not_called_out_of_memory(featurized, tmp_path,
                                                           monkeypatch):
    featurized("matbench_steels")

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(training, "member_losses", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
                  "--epochs", "1", "--out-dir", str(tmp_path), "--no-progress"])


def test_gpu_index_beyond_the_machine_is_refused(featurized, tmp_path, capsys,
                                                 monkeypatch):
    import torch

    featurized("matbench_steels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--device", "cuda:2", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "torch sees 2 GPU(s), cuda:0 to cuda:1" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["duplicate", "target", "element"])
def test_broken_featurized_file_says_rebuild(featurized, tmp_path, capsys, monkeypatch,
                                             case):
    featurized("matbench_steels")
    df = pd.read_csv(DATA_PATHS["matbench_steels"])
    if case == "duplicate":
        df = pd.concat([df, df.iloc[:1]])
        message = "appear more than once"
    elif case == "target":
        df["target"] = df["target"].astype(object)
        df.loc[3, "target"] = "strong"
        message = "non-numeric target"
    else:
        df.loc[5, "composition"] = "Xx2O3"
        message = "cannot read composition 'Xx2O3'"
    path = tmp_path / "matbench_steels.csv.gz"
    df.to_csv(path, index=False)
    monkeypatch.setitem(DATA_PATHS, "matbench_steels", str(path))
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(tmp_path / "o"),
                     "--run-name", "b"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "--force" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_says_what_to_do(featurized, tmp_path, capsys):
    featurized("matbench_steels")
    ckpt = tmp_path / "checkpoints" / "t" / "matbench_steels-fold_0.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(tmp_path), "--run-name",
                     "t", "--checkpoint", "local"])
    err = capsys.readouterr().err
    assert code == 2 and "is unreadable" in err and "delete it" in err
    assert not list(tmp_path.rglob("*.json"))


def test_no_room_for_checkpoints_refused_before_training(featurized, tmp_path,
                                                         monkeypatch, capsys):
    import shutil

    featurized("matbench_steels")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(
        10**9, 10**9 - 10**5, 10**5))
    code = run_main(["--model", "roostformer", "--task", "matbench_steels", "--fold",
                     "0", "--epochs", "1", "--out-dir", str(tmp_path), "--run-name",
                     "t", "--checkpoint", "local"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "GB free" in err and "--checkpoint none" in err
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.pt"))
    assert not (tmp_path / "checkpoints").exists()


def test_second_process_on_the_same_checkpoint_refused(featurized, tmp_path, capsys):
    """While one process trains a run's checkpoint (holds its lock), a second one
    that would train it is refused with one line and writes nothing; once the
    first is gone (even killed), the run goes ahead."""
    featurized("matbench_steels")
    argv = ["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
            "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "twice",
            "--checkpoint", "local", "--no-progress", "--d-model", "32",
            "--n-attn-heads", "2", "--n-attn-layers", "1"]
    lock = tmp_path / "checkpoints" / "twice" / "matbench_steels-fold_0.pt.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holding the lock, as a training
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
         "time.sleep(600)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another process is training this run" in err
        assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.pt"))
    finally:
        holder.kill()
        holder.wait()
    assert run_main(argv) == 0  # the killed holder left no lock behind
    scores = read_json_results(tmp_path / "model_scores" / "twice.json")
    assert list(scores["matbench_steels"]) == ["fold_0"]


@pytest.mark.parametrize(("min_seconds", "saved_after"),
                         [(0.0, [10, 20, 25]), (1e9, [10, 25])])
def test_checkpoints_every_10_epochs_but_not_too_often(featurized, tmp_path,
                                                       monkeypatch, min_seconds,
                                                       saved_after):
    """A checkpoint every 10 epochs and at the end, but not sooner than
    CHECKPOINT_MIN_SECONDS after the last one this process saved (the first is
    always saved): a fast GPU run does not spend its time writing checkpoints."""
    import mat_bench.run_matbench as run_module

    featurized("matbench_steels")
    saved: list[int] = []
    monkeypatch.setattr(run_module, "save_checkpoint",
                        lambda _path, state, _meta: saved.append(state.epoch))
    monkeypatch.setattr(run_module, "CHECKPOINT_MIN_SECONDS", min_seconds)
    run_matbench("roostformer", "matbench_steels", 0, epochs=25, run_name="often",
                 out_dir=tmp_path, checkpoint="local", progress=False, **TINY)
    assert saved == saved_after


def test_checkpoint_write_failure_warns_and_training_goes_on(featurized, tmp_path,
                                                             monkeypatch, capsys):
    """A checkpoint that cannot be written (full disk) costs a warning, not the run."""
    import mat_bench.run_matbench as run_module

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    featurized("matbench_steels")
    monkeypatch.setattr(run_module, "save_checkpoint", disk_full)
    run_matbench("roostformer", "matbench_steels", 0, epochs=2, run_name="full",
                 out_dir=tmp_path, checkpoint="local", progress=False, **TINY)
    err = capsys.readouterr().err
    assert "checkpoint after epoch 2 could not be written" in err
    assert "No space left on device" in err
    check_fold_files(tmp_path, "full", "matbench_steels", 0, "mae", 63)


@pytest.mark.parametrize("checkpoint", ["local", "none"])
def test_ctrl_c_ends_with_one_line(featurized, tmp_path, checkpoint):
    """Ctrl-C: with checkpoints the epoch finishes, a checkpoint is saved and the run
    exits 130 with one line; without, it stops at once, also with one line."""
    featurized("matbench_steels")
    cmd = [sys.executable, "run_matbench.py", "--model", "roostformer", "--task",
           "matbench_steels", "--fold", "1", "--epochs", "300", "--run-name", "int",
           "--out-dir", str(tmp_path), "--checkpoint", checkpoint, "--no-progress",
           *[str(x) for kv in TINY.items() for x in (f"--{kv[0].replace('_', '-')}",
                                                    kv[1])]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "checkpoints" / "int" / "matbench_steels-fold_1.pt"
    deadline = time.time() + 240
    # wait until training runs (the first periodic checkpoint, or a few seconds)
    while time.time() < deadline and proc.poll() is None and not (
            ckpt.exists() if checkpoint == "local" else False):
        time.sleep(0.2)
        if checkpoint == "none" and time.time() > deadline - 230:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("stopped by SIGINT")
    if checkpoint == "local":
        assert "checkpoint saved" in lines[-1] and ckpt.exists()
    else:
        assert len(lines) == 1 and not ckpt.exists()
    assert not list(tmp_path.rglob("*.json"))


# --- validation records: ensembles on a shared split, the threshold --------------
def test_fold_validation_scores_the_ensemble_and_picks_the_threshold():
    rng = np.random.default_rng(1)
    targets = np.array([1] * 60 + [0] * 20)
    members = np.clip(0.7 + 0.25 * (targets - 0.5) + rng.normal(0, 0.05, (3, 80)),
                      0, 1)
    out = fold_validation(members, targets, "classification", "median", True)
    ensemble = np.median(members, axis=0)
    assert out["threshold"] == training.best_threshold(targets, ensemble)
    assert out["val_balanced_accuracy_default"] == balanced_accuracy_score(
        targets, ensemble > 0.5)
    assert out["val"]["rocauc"] >= out["val_balanced_accuracy_default"]
    # runs are compared on validation by the probabilities' ROC-AUC
    assert out["val_rocauc_prob"] == out["val"]["rocauc_prob"] == roc_auc_score(
        targets, ensemble)
    assert out["val_members"] == [roc_auc_score(targets, m) for m in members]
    at_mean = fold_validation(members, targets, "classification", "mean", False)
    assert at_mean["threshold"] == training.CLASS_THRESHOLD
    assert "val_balanced_accuracy_prior" not in at_mean  # no training share given
    # 75% of the training split is class 1: labels above 0.75 are balanced
    # accuracy's threshold for calibrated probabilities
    prior = fold_validation(members, targets, "classification", "mean", False, 0.75)
    assert prior["val_balanced_accuracy_prior"] == balanced_accuracy_score(
        targets, members.mean(axis=0) > 0.75)
    assert prior["val_balanced_accuracy_prior"] > prior[
        "val_balanced_accuracy_default"]
    reg = fold_validation(np.array([[1.0, 2.0], [3.0, 2.0], [8.0, 2.0]]),
                          np.array([3.0, 2.0]), "regression", "median", False)
    assert reg["val_mae"] == 0.0 and reg["val_by_aggregation"]["mean"] == 0.5
    assert aggregate(np.array([[0.0], [1.0], [5.0]]), "median")[0] == 1.0


def test_members_of_a_fold_share_their_validation_split():
    import pandas as pd

    df = pd.DataFrame({"composition": ["Fe"] * 50}, index=[f"m{i}" for i in range(50)])
    fold_ids = {0: (list(df.index[:40]), []), 3: (list(df.index[10:]), [])}
    members, _ = split_members(df, "composition", fold_ids, 3, 7, 0.2)
    assert [(m.fold, m.seed) for m in members] == [(f, s) for f in (0, 3)
                                                  for s in (7, 8, 9)]
    for fold in (0, 3):
        group = [m for m in members if m.fold == fold]
        assert len(group[0].val_idx) == 8
        for member in group[1:]:
            assert np.array_equal(member.val_idx, group[0].val_idx)
            assert np.array_equal(member.fit_idx, group[0].fit_idx)
        assert not set(group[0].val_idx) & set(group[0].fit_idx)
    # a single member keeps the split it had before splits were shared
    (solo,), _ = split_members(df, "composition", {0: fold_ids[0]}, 1, 7, 0.2)
    perm = np.random.default_rng(7).permutation(40)
    assert np.array_equal(solo.val_idx, perm[:8])


@pytest.mark.parametrize(("flags", "message"), [
    (["--task", "matbench_glass", "--val-threshold", "--val-fraction", "0"],
     "needs a validation split"),
    (["--task", "matbench_steels", "--epoch-choice", "--val-fraction", "0"],
     "add --no-epoch-choice"),
    (["--task", "matbench_steels", "--frac-jitter", "0.7"], "--frac-jitter must be"),
    (["--task", "matbench_steels", "--log-target", "--gate"], "cannot be combined"),
])
def test_lever_mistakes_say_what_to_do(tmp_path, capsys, flags, message):
    code = run_main(["--model", "roostformer", "--fold", "0", *flags,
                     "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_log_target_of_a_task_with_zeros_is_refused_before_training(
        featurized, tmp_path, capsys):
    """expt_gap's metals have a band gap of 0 eV, which has no log: --log-target
    says so in one line after loading the task and before training or writing;
    classification ignores the flag (it does not act there)."""
    from mat_bench import runs

    featurized("matbench_expt_gap")
    code = run_main(["--model", "roostformer", "--task", "matbench_expt_gap",
                     "--fold", "0", "--log-target", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--log-target needs targets above 0" in err and "drop --log-target" in err
    assert not list(tmp_path.iterdir())
    assert not runs.acts("log_target", "roostformer", "matbench_glass")
    assert runs.acts("log_target", "roostformer", "matbench_dielectric")


def test_labels_above_the_training_share_of_class_1(featurized, tmp_path):
    """By default (--prior-threshold) a fold's labels are its probabilities above
    its training split's share of class 1, with or without a validation split;
    --no-prior-threshold keeps matbench's 0.5."""
    featurized("matbench_glass")
    train_ids, _ = get_fold_ids("matbench_glass", 3)
    share = float(load_featurized("matbench_glass").loc[train_ids].target.mean())
    # glass's default epoch choice needs a validation split: refused before loading
    with pytest.raises(UserError, match="add --no-epoch-choice"):
        run_matbench("roostformer", "matbench_glass", 3, epochs=1, val_fraction=0,
                     run_name="prior", out_dir=tmp_path, progress=False, **TINY)
    assert not list(tmp_path.iterdir())
    entry = run_matbench("roostformer", "matbench_glass", 3, epochs=1, val_fraction=0,
                         epoch_choice=False, run_name="prior", out_dir=tmp_path,
                         progress=False, **TINY)[3]
    assert entry["threshold"] == pytest.approx(share) and 0.7 < share < 0.72
    _, preds = check_fold_files(tmp_path, "prior", "matbench_glass", 3, "rocauc",
                                entry["n_test"])
    assert preds["prediction"] == [int(p > share) for p in preds["probability"]]
    entry = run_matbench("roostformer", "matbench_glass", 3, epochs=1,
                         prior_threshold=False, run_name="half", out_dir=tmp_path,
                         progress=False, **TINY)[3]
    assert entry["threshold"] == 0.5 and "val_balanced_accuracy_prior" in entry


def test_run_records_threshold_and_ensemble_validation(featurized, tmp_path):
    """A classification ensemble with --val-threshold: the labels are the mean
    probability at the threshold chosen on validation, which the scores record
    with the validation metrics of each aggregation."""
    featurized("matbench_glass")
    code = run_main(["--model", "roostformer", "--task", "matbench_glass", "--fold",
                     "1", "--ensemble", "2", "--epochs", "1", "--d-model", "16",
                     "--n-attn-heads", "2", "--n-attn-layers", "1", "--val-threshold",
                     "--frac-jitter", "0.02", "--out-dir", str(tmp_path), "--run-name",
                     "t", "--no-progress"])
    assert code == 0
    scores = json.loads((tmp_path / "model_scores" / "t.json").read_text())
    entry = scores["matbench_glass"]["fold_1"]
    from mat_bench.data import preds_file, read_json_results

    preds = read_json_results(preds_file(tmp_path / "model_preds", "t",
                                         "matbench_glass"))["matbench_glass"]["fold_1"]
    probs = np.array(preds["probability"])
    assert preds["prediction"] == (probs > entry["threshold"]).astype(int).tolist()
    # rocauc is Matbench's: of the recorded labels, so their balanced accuracy
    assert entry["rocauc"] == pytest.approx(balanced_accuracy_score(
        preds["target"], preds["prediction"]))
    assert entry["rocauc"] == pytest.approx(roc_auc_score(preds["target"],
                                                          preds["prediction"]))
    assert entry["rocauc_prob"] == pytest.approx(roc_auc_score(preds["target"],
                                                               probs))
    assert set(entry["val_by_aggregation"]) == {"mean", "median"}
    assert entry["aggregation"] == "mean"  # auto: the mean probability
    assert entry["val_rocauc_prob"] == entry["val"]["rocauc_prob"]
    assert 0 <= entry["val_balanced_accuracy_prior"] <= 1
    assert all("val" in member for member in entry["members"])
    assert entry["params"]["val_threshold"] and entry["params"]["frac_jitter"] == 0.02


# --- epoch levers measured beside the recipe: SWA, the epoch chosen on validation --
def test_epoch_choice_is_cross_fitted():
    """Each member's epoch is chosen on one half of the validation split and scored
    on the other: an epoch that is perfect on one half only does not score as
    perfect."""
    n = 40
    targets = np.linspace(0.0, 4.0, n)
    half = np.random.default_rng(0).permutation(n) % 2 == 0
    lucky = targets + np.where(half, 0.0, 5.0)  # exact on one half, 5 off on the other
    steady = targets + 1.0
    final = targets + 2.0
    curve = np.stack([np.stack([lucky] * 2), np.stack([steady] * 2),
                      np.stack([final] * 2)])  # (epochs, members, materials)
    out = epoch_choice_validation(curve, [10, 20, 30], targets, "regression", "mean")
    assert out["epochs"] == [[10, 10], [20, 20]]  # chosen on `half`, then on ~half
    assert out["chosen"] == pytest.approx((5.0 + 1.0) / 2)
    assert out["final"] == pytest.approx(2.0) and out["metric"] == "mae"
    labels = np.array([1] * n)
    assert epoch_choice_validation(curve, [10, 20, 30], labels, "classification",
                                   "mean") == {}  # one class: no ROC-AUC


def test_run_records_epoch_levers_across_a_resume(featurized, tmp_path, monkeypatch,
                                                   capsys):
    """A run records, per fold and on validation only, its members' weights
    averaged over the last quarter of the epochs (val_swa) and the cross-fitted
    epoch choice; a SIGTERM inside that window checkpoints the average, and the
    resumed run averages on from it. The test predictions stay the last epoch's."""
    featurized("matbench_steels")
    argv = ["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
            "--ensemble", "2", "--epochs", "12", "--batch-size", "32", "--out-dir",
            str(tmp_path), "--run-name", "lev", "--checkpoint", "local",
            "--no-progress", "--frac-jitter", "0",
            *[str(x) for kv in TINY.items() for x in (f"--{kv[0].replace('_', '-')}",
                                                     kv[1])]]
    original = training.average_weights

    def average_then_stop(state):
        original(state)
        if state.n_averaged == 2:  # after epoch 11 of the window 10-12
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(training, "average_weights", average_then_stop)
    assert run_main(argv) == 128 + signal.SIGTERM
    monkeypatch.setattr(training, "average_weights", original)
    assert run_main(argv) == 0
    assert "resuming matbench_steels fold_0 from epoch 11" in capsys.readouterr().out
    entry = read_json_results(tmp_path / "model_scores" / "lev.json")[
        "matbench_steels"]["fold_0"]
    swa = entry["val_swa"]
    assert swa["epochs_averaged"] == 3 and swa["metric"] == "mae"
    assert len(swa["members"]) == 2 and all(map(math.isfinite, swa["members"]))
    assert swa["ensemble"] != entry["val_mae"]  # other weights than the last epoch's
    choice = entry["val_epoch_choice"]
    assert [len(epochs) for epochs in choice["epochs"]] == [2, 2]
    assert all(set(epochs) <= {10, 12} for epochs in choice["epochs"])
    assert math.isfinite(choice["chosen"]) and math.isfinite(choice["final"])
    import torch

    saved = torch.load(tmp_path / "checkpoints" / "lev"
                       / "matbench_steels-fold_0-ensemble_2.pt", weights_only=False)
    assert saved["n_averaged"] == 3 and len(saved["weight_average"]) == len(
        saved["model_state"])
    assert [epoch for epoch, _ in saved["val_curve_preds"]] == [10, 12]


def test_epoch_choice_predicts_at_each_members_best_epoch_across_a_resume(
        featurized, tmp_path, monkeypatch, capsys):
    """--epoch-choice: each member predicts with its weights from the curve epoch
    with its best validation score, chosen on its validation split only and kept
    across a SIGTERM and resume; the scores record each member's epoch, and its
    validation score at the weights it predicts with is its curve's best."""
    import torch

    featurized("matbench_steels")
    monkeypatch.setattr(training, "VAL_CURVE_EPOCHS", 2)
    argv = ["--model", "roostformer", "--task", "matbench_steels", "--fold", "0",
            "--ensemble", "2", "--epochs", "12", "--batch-size", "32", "--out-dir",
            str(tmp_path), "--run-name", "ec", "--checkpoint", "local",
            "--no-progress", "--frac-jitter", "0", "--epoch-choice",
            *[str(x) for kv in TINY.items() for x in (f"--{kv[0].replace('_', '-')}",
                                                     kv[1])]]
    original = training.keep_best_epochs

    def keep_then_stop(state, epoch, *args):
        original(state, epoch, *args)
        if epoch == 6:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(training, "keep_best_epochs", keep_then_stop)
    assert run_main(argv) == 128 + signal.SIGTERM
    ckpt = tmp_path / "checkpoints" / "ec" / "matbench_steels-fold_0-ensemble_2.pt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 6 and len(saved["chosen_weights"]) == len(
        saved["model_state"])
    curve = np.array([scores for _, scores in saved["val_curve"]])  # (epochs, M)
    assert saved["chosen_epochs"] == [2 * (int(np.argmin(curve[:, m])) + 1)
                                      for m in range(2)]
    monkeypatch.setattr(training, "keep_best_epochs", original)
    assert run_main(argv) == 0
    assert "resuming matbench_steels fold_0 from epoch 6" in capsys.readouterr().out
    entry = read_json_results(tmp_path / "model_scores" / "ec.json")[
        "matbench_steels"]["fold_0"]
    assert entry["params"]["epoch_choice"] is True
    epochs, members = entry["val_curve"]["epochs"], entry["val_curve"]["members"]
    assert epochs == [2, 4, 6, 8, 10, 12]
    best = [int(np.argmin(member)) for member in members]
    assert entry["epochs_chosen"] == [epochs[t] for t in best]
    for member, curve_scores, t in zip(entry["members"], members, best, strict=True):
        assert member["val"] == pytest.approx(curve_scores[t], rel=1e-4)
    # the lever's own honest measure sits beside it, from the same curve
    assert math.isfinite(entry["val_epoch_choice"]["chosen"])
