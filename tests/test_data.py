"""data.py: Matbench's folds, raw data found offline (or a clear error), and the
result files under many concurrent (and killed) writers."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from mat_bench.data import (
    UserError,
    get_fold_ids,
    load_raw_task,
    merge_fold_result,
    merge_fold_results,
    preds_file,
    read_json_results,
    read_run_preds,
)


# --- folds --------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["matbench_steels", "matbench_phonons",
                                  "matbench_mp_e_form"])
def test_fold_ids_are_matbenchs(task):
    from matbench.task import MatbenchTask

    mb_task = MatbenchTask(task, autoload=False)
    all_test = []
    for fold in range(5):
        train_ids, test_ids = get_fold_ids(task, fold)
        assert list(mb_task.validation[f"fold_{fold}"].test) == test_ids
        assert list(mb_task.validation[f"fold_{fold}"].train) == train_ids
        assert not set(train_ids) & set(test_ids)
        all_test += test_ids
    assert len(all_test) == len(set(all_test)) == mb_task.metadata.n_samples


# --- result files: many writers, nothing lost ---------------------------------

def _merge_worker(args):
    path, idx = args
    merge_fold_result(path, f"task_{idx % 4}", idx, {"value": idx, "pad": "x" * 5000})


def test_concurrent_merges_lose_nothing(tmp_path):
    path = tmp_path / "model_scores" / "many.json"
    n_writers = 32
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(16) as pool:  # 16 processes writing at once, 32 entries in all
        pool.map(_merge_worker, [(path, idx) for idx in range(n_writers)], chunksize=1)
    data = json.loads(path.read_text())
    found = {(task, fold) for task, folds in data.items() for fold in folds}
    assert found == {(f"task_{i % 4}", f"fold_{i}") for i in range(n_writers)}
    assert all(data[f"task_{i % 4}"][f"fold_{i}"]["value"] == i
               for i in range(n_writers))


# --- raw data ------------------------------------------------------------------

def test_missing_raw_data_says_what_to_do(monkeypatch, tmp_path):
    """A task with no local copy goes to matminer's download, under a socket
    timeout (a silent network fails instead of hanging), and a failed download says
    where to put the local copy."""
    import socket

    import matbench.data_ops

    from mat_bench.data import DOWNLOAD_TIMEOUT_S

    monkeypatch.setenv("MATBENCH_RAW_DIR", str(tmp_path))
    before = socket.getdefaulttimeout()

    def no_network(name):
        assert socket.getdefaulttimeout() == DOWNLOAD_TIMEOUT_S
        raise ConnectionError("no network")

    monkeypatch.setattr(matbench.data_ops, "load", no_network)
    with pytest.raises(UserError, match="set MATBENCH_RAW_DIR"):
        load_raw_task("matbench_steels")
    assert socket.getdefaulttimeout() == before


def test_raw_dir_that_does_not_exist_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("MATBENCH_RAW_DIR", f"{tmp_path}:{tmp_path / 'typo'}")
    with pytest.raises(UserError, match="typo, which is not a folder"):
        load_raw_task("matbench_steels")


def test_corrupt_raw_file(monkeypatch, tmp_path):
    (tmp_path / "matbench_steels.json.bz2").write_bytes(b"not bz2 at all")
    monkeypatch.setenv("MATBENCH_RAW_DIR", str(tmp_path))
    with pytest.raises(UserError, match="could not load matbench_steels"):
        load_raw_task("matbench_steels")


def _merging_writer(args):
    """Merge folds into one run's two files again and again (killed from outside)."""
    from mat_bench.data import merge_fold_results

    out, worker = args
    for idx in range(10_000):
        fold = (worker * 7 + idx) % 5
        entry = ({"prediction": [idx] * 500}, {"mae": float(idx)})
        merge_fold_results(out / "model_preds" / "k.json",
                           out / "model_scores" / "k.json", f"task_{worker}",
                           {fold: entry})


def test_killed_writers_leave_predictions_and_scores_in_step(tmp_path):
    """8 processes merge folds at once; 3 are SIGKILLed at random moments. Scores
    never name a fold whose predictions are missing, and after the next merge both
    files hold the same (task, fold) entries."""
    import random

    from mat_bench.data import merge_fold_results

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_merging_writer, args=((tmp_path, w),))
             for w in range(8)]
    for proc in procs:
        proc.start()
    time.sleep(4)
    rng = random.Random(0)
    for proc in rng.sample(procs, 3):
        time.sleep(rng.uniform(0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
    time.sleep(1)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join()
    keys = lambda path: {(t, f) for t, folds in read_json_results(path).items()  # noqa: E731
                         for f in folds}
    preds = tmp_path / "model_preds" / "k.json"
    scores = tmp_path / "model_scores" / "k.json"
    assert keys(scores) and keys(scores) <= keys(preds)
    merge_fold_results(preds, scores, "task_0", {0: ({"prediction": []}, {"mae": 0.0})})
    assert keys(preds) == keys(scores)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_predictions_are_gzipped_per_task_and_old_run_files_still_read(tmp_path):
    preds_dir, scores = tmp_path / "model_preds", tmp_path / "model_scores" / "r.json"
    for task, fold in (("matbench_steels", 0), ("matbench_glass", 2)):
        merge_fold_results(preds_file(preds_dir, "r", task), scores, task,
                           {fold: ({"prediction": [fold]}, {"mae": 1.0})})
    path = preds_file(preds_dir, "r", "matbench_steels")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    first = path.read_bytes()
    merge_fold_results(path, scores, "matbench_steels",
                       {0: ({"prediction": [0]}, {"mae": 1.0})})
    assert path.read_bytes() == first  # no timestamp: equal content, equal bytes
    # a run written before predictions were split per task: its RUN.json is read,
    # and per-task files win over it
    (preds_dir / "r.json").write_text(json.dumps(
        {"matbench_jdft2d": {"fold_1": {"prediction": [1]}},
         "matbench_steels": {"fold_0": {"prediction": ["old"]}}}))
    preds = read_run_preds(preds_dir, "r")
    assert sorted(preds) == ["matbench_glass", "matbench_jdft2d", "matbench_steels"]
    assert preds["matbench_steels"]["fold_0"]["prediction"] == [0]
    path.write_bytes(first[:20])  # a truncated gzip file is refused, not overwritten
    with pytest.raises(UserError, match="not valid JSON"):
        read_run_preds(preds_dir, "r")


def test_scores_from_before_rocauc_meant_the_labels_are_read_renamed(tmp_path):
    """Until 2026-11-28 a classification fold's `rocauc` was the ROC-AUC of the
    probabilities; read, it is `rocauc_prob`, and `rocauc` is Matbench's (of the
    labels), where the old entry had it as `balanced_accuracy`."""
    old = {"rocauc": 0.95, "balanced_accuracy": 0.9, "val_rocauc": 0.96,
           "val": {"rocauc": 0.96, "balanced_accuracy": 0.91},
           "members": [{"seed": 0, "rocauc": 0.94}], "accuracy": 0.92}
    new = {"rocauc": 0.9, "rocauc_prob": 0.95, "val_rocauc_prob": 0.96}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"matbench_glass": {"fold_0": old, "fold_1": new},
                                "matbench_steels": {"fold_0": {"mae": 1.0}}}))
    data = read_json_results(path)
    fold = data["matbench_glass"]["fold_0"]
    assert fold["rocauc"] == 0.9 and fold["rocauc_prob"] == 0.95
    assert "balanced_accuracy" not in fold and fold["val_rocauc_prob"] == 0.96
    assert fold["val"] == {"rocauc": 0.91, "rocauc_prob": 0.96}
    assert fold["members"] == [{"seed": 0, "rocauc_prob": 0.94}]
    assert data["matbench_glass"]["fold_1"] == new  # written since: as it is
    assert data["matbench_steels"]["fold_0"] == {"mae": 1.0}


def test_committed_classification_scores_are_matbenchs():
    """Every committed classification fold records `rocauc` as Matbench scores the
    recorded labels, and `rocauc_prob` from the recorded probabilities."""
    from sklearn.metrics import roc_auc_score

    from mat_bench import ROOT, TASK_INFO
    from mat_bench.data import scores_file

    checked = 0
    for path in sorted((Path(ROOT) / "model_scores").glob("*.json")):
        run = path.stem
        scores = json.loads(path.read_text())  # as written, not as upgraded
        preds = read_run_preds(Path(ROOT) / "model_preds", run)
        assert scores == read_json_results(scores_file(path.parent, run))
        for task, folds in scores.items():
            if TASK_INFO[task].task_type != "classification":
                continue
            for key, entry in folds.items():
                fold = preds[task][key]
                assert entry["rocauc"] == pytest.approx(
                    roc_auc_score(fold["target"], fold["prediction"]), abs=1e-12)
                assert entry["rocauc_prob"] == pytest.approx(
                    roc_auc_score(fold["target"], fold["probability"]), abs=1e-12)
                checked += 1
    assert checked >= 15
