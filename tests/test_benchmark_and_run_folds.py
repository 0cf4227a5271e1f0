"""benchmark_training.py on a tiny slice (a proof that it runs, no timing asserts) and
run_folds.py's resumable multi-fold runs and validation-only grid search."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mat_bench.benchmark_training import main as bench_main
from mat_bench.data import read_json_results
from mat_bench.run_folds import main as folds_main

TINY = ["--d-model", "32", "--n-heads", "2", "--n-attn-layers", "1", "--epochs", "1"]
REPO = Path(__file__).resolve().parent.parent


def pids_naming(text: str) -> list[int]:
    """The processes whose command line holds `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def kill_processes_naming(text: str) -> None:
    """SIGKILL every process whose command line holds `text` (a test's leftovers)."""
    for pid in pids_naming(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_benchmark_runs_both_loops_on_a_tiny_slice(featurized, tmp_path, capsys):
    featurized("matbench_expt_gap")
    out = tmp_path / "rows.json"
    assert bench_main(["--cases", "roostformer-expt_gap", "--max-train", "64",
                       "--epochs", "2", "--repeats", "2", "--no-amp",
                       "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["impl"] for row in rows] == ["aviary", "ours (fp32)"]
    for row in rows:
        assert row["n_train"] == 64 and row["runs"] == 2
        assert (row["samples_per_s_min"] <= row["samples_per_s"]
                <= row["samples_per_s_max"])
        assert row["peak_rss_mb"] > 0 and row["first_batch_s"] >= 0
    assert rows[1]["speedup_vs_aviary"] > 0
    assert "| roostformer-expt_gap | ours (fp32) |" in capsys.readouterr().out


def test_benchmark_measures_ours_at_another_feed_forward_width(featurized, tmp_path,
                                                               capsys):
    featurized("matbench_expt_gap")
    argv = ["--cases", "roostformer-expt_gap", "--max-train", "64", "--epochs", "2",
            "--repeats", "1", "--no-amp", "--dim-feedforward", "64"]
    with pytest.raises(SystemExit):  # aviary's loop has torch's width only
        bench_main(argv)
    assert "add --impls ours" in capsys.readouterr().err
    out = tmp_path / "rows.json"
    assert bench_main([*argv, "--impls", "ours", "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["impl"] == "ours (fp32)" and row["dim_feedforward"] == 64


def test_run_folds_skips_recorded_folds_and_grid_shows_validation(featurized, tmp_path,
                                                                  capsys):
    featurized("matbench_steels")
    argv = ["--model", "roostformer", "--run-name", "grid",
            "--tasks", "matbench_steels", "--folds", "0", "1",
            "--out-dir", str(tmp_path), "--grid", "frac_encoding_dims=0,64", *TINY]
    assert folds_main(argv) == 0
    out = capsys.readouterr().out
    assert ("4 jobs" in out and "val_mae" in out
            and "test" not in out.split("val_mae")[1])
    for enc in (0, 64):
        scores = read_json_results(tmp_path / "model_scores"
                                   / f"grid-frac_encoding_dims={enc}.json")
        folds = scores["matbench_steels"]
        assert set(folds) == {"fold_0", "fold_1"}
        assert all(f["params"]["frac_encoding_dims"] == enc for f in folds.values())
    assert folds_main(argv) == 0  # everything recorded: nothing to run again
    assert "0 jobs" in capsys.readouterr().out


def test_run_folds_per_task_stacks_the_missing_folds(featurized, tmp_path, capsys):
    featurized("matbench_steels")
    argv = ["--model", "roostformer", "--run-name", "st", "--tasks", "matbench_steels",
            "--folds", "0", "2", "--per-task", "--out-dir", str(tmp_path), *TINY]
    assert folds_main(argv) == 0
    assert "1 jobs" in capsys.readouterr().out
    scores = read_json_results(tmp_path / "model_scores" / "st.json")["matbench_steels"]
    assert sorted(scores) == ["fold_0", "fold_2"]
    assert all(entry["params"]["stacked_members"] == 2 for entry in scores.values())
    assert folds_main([*argv[:-len(TINY)], "--folds", "0", "2", "3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "1 jobs" in out and "skip st matbench_steels fold 2" in out
    scores = read_json_results(tmp_path / "model_scores" / "st.json")["matbench_steels"]
    assert scores["fold_3"]["params"]["stacked_members"] == 1
    table = tmp_path / "table.csv"  # a run's validation table, without a grid
    curves = tmp_path / "curves.csv"  # and its learning curves
    assert folds_main([*argv[:-len(TINY)], "--folds", "0", "2", "3", *TINY,
                       "--table", str(table), "--curves", str(curves)]) == 0
    (point,) = pd.read_csv(curves).to_dict("records")  # 1 epoch: the last
    assert point["epoch"] == 1 and point["folds"] == 3
    fold_vals = [scores[f]["val_mae"] for f in ("fold_0", "fold_2", "fold_3")]
    assert point["val_mae"] == pytest.approx(sum(fold_vals) / 3, rel=1e-4)
    assert (point["fold_min"], point["fold_max"]) == pytest.approx(
        (min(fold_vals), max(fold_vals)), rel=1e-4)
    assert "0 jobs" in capsys.readouterr().out
    (row,) = pd.read_csv(table).to_dict("records")
    assert row["run"] == "st" and row["task"] == "matbench_steels"
    assert row["folds"] == 3 and row["val_mae"] == pytest.approx(
        sum(scores[f]["val_mae"] for f in ("fold_0", "fold_2", "fold_3")) / 3,
        rel=1e-4)  # the table holds 5 significant digits
    # one epoch: its weights are the whole average, and no epoch is there to choose
    assert row["val_swa"] == pytest.approx(row["val_mae"], rel=1e-4)
    assert "val_epoch_chosen" not in row


def test_validation_table_means_the_epoch_levers_over_folds(tmp_path):
    """The table's lever columns (and the members' median) are the folds' mean,
    and only where every fold recorded them."""
    from mat_bench.run_folds import validation_table

    def entry(mae: float, swa: float, chosen: float | None = None) -> dict:
        out = {"val_mae": mae, "val_swa": {"metric": "val_mae", "ensemble": swa},
               "val_by_aggregation": {"mean": mae, "median": mae - 0.25}}
        if chosen is not None:
            out["val_epoch_choice"] = {"chosen": chosen, "final": mae + 0.5}
        return out

    scores = {"matbench_steels": {"fold_0": entry(1.0, 0.8, 0.7),
                                  "fold_1": entry(2.0, 1.6, 1.5)},
              "matbench_jdft2d": {"fold_0": entry(3.0, 2.0, 2.5),
                                  "fold_1": entry(5.0, 4.0)}}
    (tmp_path / "model_scores").mkdir()
    (tmp_path / "model_scores" / "lev.json").write_text(json.dumps(scores))
    rows = validation_table(tmp_path, ["lev"]).set_index("task").to_dict("index")
    steels, jdft2d = rows["matbench_steels"], rows["matbench_jdft2d"]
    assert (steels["val_mae"], steels["val_swa"]) == pytest.approx((1.5, 1.2))
    assert (steels["val_epoch_chosen"], steels["val_epoch_final"]) == pytest.approx(
        (1.1, 2.0))
    assert (steels["val_median"], jdft2d["val_swa"]) == pytest.approx((1.25, 3.0))
    assert pd.isna(jdft2d["val_epoch_chosen"])  # fold 1 recorded no choice


def run_folds_past_a_checkpoint(out_dir: Path) -> subprocess.Popen:
    """run_folds.py training folds 0 and 1 of steels one after the other (a tiny
    model, too many epochs to end), returned once fold 0 has saved a checkpoint."""
    cmd = [sys.executable, "run_folds.py", "--model", "roostformer", "--run-name",
           "sig", "--tasks", "matbench_steels", "--folds", "0", "1", "--out-dir",
           str(out_dir), "--checkpoint", "local", *TINY[:-2], "--epochs", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out_dir.glob("checkpoints/**/*.pt")):  # past epoch 10
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    return proc


def assert_fold_0_stopped_with_a_checkpoint(out_dir: Path) -> None:
    """Fold 0's job saved a checkpoint on SIGTERM and stopped; fold 1 never started;
    nothing is recorded."""
    import torch

    logs = out_dir / "job-logs"
    assert "SIGTERM: saving a checkpoint after this epoch" in (
        logs / "sig-matbench_steels-fold_0.log").read_text()
    assert not (logs / "sig-matbench_steels-fold_1.log").exists()
    assert not (out_dir / "model_scores" / "sig.json").exists()
    (ckpt,) = out_dir.glob("checkpoints/**/*.pt")
    assert torch.load(ckpt, weights_only=False)["epoch"] >= 10


def test_run_folds_passes_sigterm_on_and_starts_no_new_job(featurized, tmp_path):
    """`kill` run_folds.py: its running job saves a checkpoint after its epoch and
    stops, the next job never starts, nothing is recorded, and run_folds.py says how
    to resume."""
    featurized("matbench_steels")
    try:
        proc = run_folds_past_a_checkpoint(tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        kill_processes_naming(str(tmp_path))
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM: 1 jobs not started" in err
    assert "the same command resumes" in err
    assert_fold_0_stopped_with_a_checkpoint(tmp_path)


def test_run_folds_killed_leaves_no_training_running(featurized, tmp_path):
    """`kill -9` run_folds.py: its job is told (SIGTERM) and stops with a checkpoint
    instead of training on alone."""
    featurized("matbench_steels")
    try:
        proc = run_folds_past_a_checkpoint(tmp_path)
        proc.kill()
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 300
        while pids_naming(str(tmp_path)):
            assert time.monotonic() < deadline, "the job still runs 300 s later"
            time.sleep(0.2)
    finally:
        kill_processes_naming(str(tmp_path))
    assert_fold_0_stopped_with_a_checkpoint(tmp_path)


def test_run_folds_checks_every_flag_before_a_job_starts(tmp_path, capsys):
    base = ["--model", "roostformer", "--tasks", "matbench_steels", "--out-dir",
            str(tmp_path)]
    for extra, message in ((["--run-name", "../x"], "must be a plain file name"),
                           (["--run-name", "ok", "--dropout", "2"], "--dropout must"),
                           (["--run-name", "ok", "--epochz", "3"],
                            "options of run_folds.py: `python run_folds.py --help`"),
                           (["--run-name", "ok", "--grid", "epochs=abc"],
                            "run_matbench.py: argument --epochs: invalid int value: "
                            "'abc' (a flag run_folds.py passes on"),
                           (["--run-name", "ok", "--cuda-graphs"],
                            "--cuda-graphs needs GPUs (--device cuda)")):
        assert folds_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "slurm_submit.py" not in err, err
        assert err.count("\n") == 1, err  # one line, not argparse's usage
    assert not list(tmp_path.iterdir())


def test_run_folds_bad_task(capsys):
    assert folds_main(["--model", "roostformer", "--run-name", "x", "--tasks",
                       "matbench_nope"]) == 2
    assert "unknown task 'matbench_nope'" in capsys.readouterr().err


def test_run_folds_checks_every_task_before_any_job(tmp_path, capsys):
    """Flags that cannot run on one of the tasks are refused in one line before any
    job starts: Wrenformer on a composition-only task, --log-target where a target
    is 0 (a task's featurized targets are read for it)."""
    from mat_bench import DATA_PATHS

    assert folds_main(["--model", "wrenformer", "--run-name", "x", "--tasks",
                       "matbench_steels", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "use --model roostformer" in err and err.count("\n") == 1
    gap = tmp_path / "gap.csv.gz"
    pd.DataFrame({"mbid": ["mb-x-1", "mb-x-2"], "composition": ["NaCl", "Fe"],
                  "target": [1.5, 0.0]}).to_csv(gap, index=False)
    out_dir = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DATA_PATHS, "matbench_expt_gap", str(gap))
        assert folds_main(["--model", "roostformer", "--run-name", "x", "--tasks",
                           "matbench_expt_gap", "--log-target", "--out-dir",
                           str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "drop --log-target" in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_run_folds_checks_each_tasks_own_defaults_before_any_job(tmp_path, capsys):
    """Wrenformer's phonons default is a log target, so --gate clashes there: one
    line naming the task and the way out, before any job starts."""
    out_dir = tmp_path / "out"
    assert folds_main(["--model", "wrenformer", "--run-name", "x", "--tasks",
                       "matbench_phonons", "--gate", "--out-dir", str(out_dir),
                       "--folds", "0", "--epochs", "1"]) == 2  # (short, were it to run)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "matbench_phonons: --log-target" in err and "add --no-log-target" in err
    assert not out_dir.exists()


def test_run_folds_refuses_a_run_name_holding_another_model(tmp_path, capsys):
    scores = tmp_path / "model_scores" / "mixed.json"
    scores.parent.mkdir()
    scores.write_text(json.dumps({"matbench_steels": {
        "fold_0": {"mae": 1.0, "params": {"model": "wrenformer"}}}}))
    assert folds_main(["--model", "roostformer", "--run-name", "mixed", "--tasks",
                       "matbench_steels", "--out-dir", str(tmp_path)]) == 2
    assert "holds wrenformer results" in capsys.readouterr().err


def test_run_folds_adds_folds_to_a_run_only_at_its_recipe(tmp_path, capsys):
    """A run whose recorded folds hold 5 members: new folds without --ensemble 5
    are refused in one line before any job starts (run_matbench.py alone too)."""
    from mat_bench.runs import DEFAULTS

    scores = tmp_path / "model_scores" / "r.json"
    scores.parent.mkdir()
    scores.write_text(json.dumps({"matbench_steels": {"fold_0": {
        "mae": 1.0, "params": {**DEFAULTS, "model": "roostformer", "ensemble": 5}}}}))
    before = scores.read_bytes()
    base = ["--model", "roostformer", "--run-name", "r", "--tasks", "matbench_steels",
            "--out-dir", str(tmp_path)]
    assert folds_main([*base, "--folds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "ensemble 5 (this run: 1)" in err and err.count("\n") == 1
    # fold 0 is recorded and skipped: nothing to run, nothing to refuse
    assert folds_main([*base, "--folds", "0"]) == 0
    proc = subprocess.run([sys.executable, "run_matbench.py", "--model", "roostformer",
                           "--task", "matbench_steels", "--fold", "1", "--run-name",
                           "r", "--out-dir", str(tmp_path), "--epochs", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "epochs 300 (this run: 1), ensemble 5 (this run: 1)" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert scores.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_scores"]


def test_speedup_pairs_runs_by_name_whatever_the_order():
    from mat_bench.benchmark_training import summarize

    run = {"samples_per_s": 0.0, "first_batch_s": 0.1, "peak_rss_mb": 1}
    runs = {"ours": [{**run, "samples_per_s": 300.0}, {**run, "samples_per_s": 200.0}],
            "aviary": [{**run, "samples_per_s": 100.0}, {**run, "samples_per_s": 50.0}]}
    ours, aviary = summarize(runs)
    assert ours["speedup_vs_aviary"] == 3.5 and "speedup_vs_aviary" not in aviary
