"""slurm_submit.py: planning and errors without SLURM, then against a real local SLURM
cluster (tests/slurm_cluster.py): a whole job array of real training runs merging
into one run's files, --only-missing, sbatch's own errors, and an element that is
told its time is up, requeues itself and resumes from its checkpoint."""

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from slurm_cluster import LocalSlurmCluster, slurm_cluster  # noqa: F401

from mat_bench import DATA_PATHS, STRUCTURE_TASKS
from mat_bench.data import (
    UserError,
    get_fold_ids,
    read_json_results,
    read_run_preds,
    update_json_results,
)
from mat_bench.runs import DEFAULTS, done_pairs, select_pairs
from mat_bench.slurm_submit import main

REPO = Path(__file__).resolve().parent.parent
SUBMIT = [sys.executable, str(REPO / "slurm_submit.py")]
TASKS = ("matbench_steels", "matbench_jdft2d")  # the two smallest tasks
TINY = ["--d-model", "32", "--n-attn-heads", "2", "--n-attn-layers", "1"]


def script_pairs(script: str) -> list[tuple[str, int]]:
    """The (task, fold) pairs listed in a job script."""
    block = script.split("PAIRS=(", 1)[1].split(")", 1)[0]
    return [(t, int(f)) for t, f in re.findall(r"'(\w+) (\d)'", block)]


def fake_featurized(monkeypatch, tmp_path, task: str, labels: bool = False) -> None:
    """A minimal featurized file for `task` (with or without Wyckoff labels)."""
    path = tmp_path / f"{task}.csv.gz"
    df = pd.DataFrame({"mbid": ["mb-x-1", "mb-x-2"], "composition": ["NaCl", "Fe"],
                       "target": [1.0, 2.0]})
    if labels:
        df["protostructure"] = ["AB_cF8_225_a_b:Cl-Na", ""]
    df.to_csv(path, index=False)
    monkeypatch.setitem(DATA_PATHS, task, str(path))


# --- without SLURM ----------------------------------------------------------------
def test_dry_run_prints_command_and_script_and_writes_nothing(monkeypatch, tmp_path,
                                                              capsys):
    for task in TASKS:
        fake_featurized(monkeypatch, tmp_path, task)
    out_dir = tmp_path / "out"
    rc = main(["--model", "roostformer", "--run-name", "dry", "--tasks", *TASKS,
               "--folds", "0", "3", "--epochs", "7", "--d-model", "64",
               "--out-dir", str(out_dir), "--partition", "gpu", "--account", "abc",
               "--time", "02:00:00", "--gpus-per-node", "a100:1",
               "--cpus-per-task", "8",
               "--mem", "40G", "--max-parallel", "3", "--pre-cmd", "module load cuda",
               "--sbatch-args=--qos=high --constraint=a100", "--requeue", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and not out_dir.exists()
    sbatch = next(line for line in out.splitlines() if line.startswith("sbatch "))
    for opt in ["--array=0-3%3", "--partition=gpu", "--account=abc",
                "--time=02:00:00", "--gpus-per-node=a100:1", "--cpus-per-task=8",
                "--mem=40G", "--qos=high", "--constraint=a100", "--requeue",
                "--signal=B:USR1@300", f"--output={out_dir}/job-logs/dry-%A_%a.log"]:
        assert opt in shlex.split(sbatch)
    script = out.split("# --- ", 1)[1]
    assert f"#   {sbatch}" in script  # the exact command in the script's header
    assert script_pairs(script) == [(t, f) for t in TASKS for f in (0, 3)]
    run_line = next(line for line in script.splitlines() if "run_matbench.py" in line)
    for arg in ['--task "$TASK"', '--fold "$FOLD"', "--run-name dry", "--epochs 7",
                "--d-model 64", "--device cuda", "--checkpoint local"]:
        assert arg in run_line
    assert "module load cuda" in script and "scontrol requeue" in script


def test_cpu_run_without_requeue_execs_python(monkeypatch, tmp_path, capsys):
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    assert main(["--model", "roostformer", "--run-name", "cpu", "--tasks",
                 "matbench_steels", "--gpus-per-node", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--gpus-per-node" not in out and "--signal" not in out
    run_line = next(line for line in out.splitlines() if "run_matbench.py" in line)
    assert run_line.startswith("exec python ") and "--device cpu" in run_line
    assert "--checkpoint" not in run_line


def test_model_task_selection(monkeypatch, tmp_path):
    for task in ("matbench_steels", "matbench_jdft2d"):
        fake_featurized(monkeypatch, tmp_path, task)
    fake_featurized(monkeypatch, tmp_path, "matbench_phonons", labels=True)
    for task in STRUCTURE_TASKS:  # featurized or not, only phonons has labels
        if task not in ("matbench_jdft2d", "matbench_phonons"):
            monkeypatch.setitem(DATA_PATHS, task, str(tmp_path / "absent.csv.gz"))
    assert select_pairs("wrenformer", None, None) == [
        ("matbench_phonons", f) for f in range(5)]
    assert select_pairs("roostformer", ["matbench_steels"], [4, 1, 1]) == [
        ("matbench_steels", 1), ("matbench_steels", 4)]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "matbench_nope"], "unknown task 'matbench_nope'"),
    (["--folds", "5"], "fold 5 is out of range"),
    (["--model", "wrenformer", "--tasks", "matbench_steels"],
     "matbench_steels is a composition-only task"),
    (["--model", "wrenformer", "--tasks", "matbench_jdft2d"],
     "matbench_jdft2d has no Wyckoff labels"),
    (["--tasks", "matbench_glass"], "featurize_matbench.py --tasks matbench_glass"),
    (["--task", "matbench_steels"], "use --tasks"),
    (["--epochz", "3"], "run_matbench.py does not take --epochz"),
    (["--d-model", "30"], "must be divisible by --n-attn-heads"),
    (["--requeue", "--checkpoint", "none"], "--requeue resumes from checkpoints"),
    (["--run-name", "a/b"], "--run-name 'a/b'"),
    (["--gpus-per-node", "one"], "--gpus-per-node takes a count"),
    (["--run-nam", "y"], "--run-name is set by slurm_submit.py"),
    (["--gpus-per-node", "0", "--cuda-graphs"], "--cuda-graphs needs GPUs"),
    (["--time", "2 hours"], "--time takes SLURM's format"),
    (["--mem", "lots"], "--mem takes a size"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--device", "tpu"], "--device 'tpu' is not supported"),
    (["--ensemble", "0"], "--ensemble must be at least 1"),
    (["--fold", "1"], "--fold"),
])
def test_clear_errors(monkeypatch, tmp_path, capsys, argv, message):
    for task in ("matbench_steels", "matbench_jdft2d"):
        fake_featurized(monkeypatch, tmp_path, task)
    monkeypatch.setitem(DATA_PATHS, "matbench_glass", str(tmp_path / "no.csv.gz"))
    base = ["--model", "roostformer", "--run-name", "x", "--tasks", "matbench_steels"]
    assert main([*base, *argv, "--dry-run"]) == 2  # argv's flags override base's
    assert message in capsys.readouterr().err


def test_log_target_without_logs_is_refused_before_submitting(monkeypatch, tmp_path,
                                                              capsys):
    """A task whose targets include 0 (expt_gap's metals) cannot take --log-target:
    one line before anything is written, whichever task of the request it is."""
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    gap = tmp_path / "gap.csv.gz"
    pd.DataFrame({"mbid": ["mb-x-1", "mb-x-2"], "composition": ["NaCl", "Fe"],
                  "target": [1.5, 0.0]}).to_csv(gap, index=False)
    monkeypatch.setitem(DATA_PATHS, "matbench_expt_gap", str(gap))
    out_dir = tmp_path / "out"
    argv = ["--model", "roostformer", "--run-name", "x", "--log-target", "--dry-run",
            "--out-dir", str(out_dir), "--tasks", "matbench_steels"]
    assert main([*argv, "matbench_expt_gap"]) == 2
    err = capsys.readouterr().err
    assert "1 of matbench_expt_gap's are not (smallest 0): drop --log-target" in err
    assert not out_dir.exists()
    assert main(argv) == 0  # steels' yield strengths are all above 0


def test_a_clash_with_a_tasks_own_defaults_is_refused_before_submitting(
        monkeypatch, tmp_path, capsys):
    """Flags are checked against each requested task's own defaults
    (runs.TASK_DEFAULTS), not only the plain ones: glass chooses its members'
    epochs on validation, so --val-fraction 0 is refused for it in one line naming
    it, before any script is written; steels alone takes it."""
    for task in ("matbench_steels", "matbench_glass"):
        fake_featurized(monkeypatch, tmp_path, task)
    out_dir = tmp_path / "out"
    argv = ["--model", "roostformer", "--run-name", "x", "--val-fraction", "0",
            "--dry-run", "--out-dir", str(out_dir), "--tasks", "matbench_steels"]
    assert main([*argv, "matbench_glass"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: matbench_glass: --epoch-choice") and err.count(
        "\n") == 1, err
    assert "add --no-epoch-choice" in err and not out_dir.exists()
    assert main([*argv, "matbench_glass", "--no-epoch-choice"]) == 0
    assert main(argv) == 0


def test_no_sbatch_says_so_and_suggests_dry_run(monkeypatch, tmp_path, capsys):
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    rc = main(["--model", "roostformer", "--run-name", "x", "--tasks",
               "matbench_steels", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "sbatch not found" in err and "--dry-run" in err
    assert not list(tmp_path.glob("out/job-logs/*.sh"))


def test_only_missing_reads_the_scores_file(monkeypatch, tmp_path, capsys):
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    scores = tmp_path / "model_scores" / "run.json"
    entry = {"mae": 1.0, "params": {**DEFAULTS, "model": "roostformer"}}
    update_json_results(scores, lambda d: d.update(
        {"matbench_steels": {f"fold_{f}": entry for f in (0, 2, 3)}}))
    assert done_pairs(scores, "roostformer") == {
        ("matbench_steels", f) for f in (0, 2, 3)}
    argv = ["--model", "roostformer", "--run-name", "run", "--tasks",
            "matbench_steels", "--out-dir", str(tmp_path), "--only-missing"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert script_pairs(out) == [("matbench_steels", 1), ("matbench_steels", 4)]
    assert "--array=0-1 " in out
    assert main([*argv, "--folds", "0", "2"]) == 0  # nothing missing: fine, no sbatch
    assert "nothing to submit" in capsys.readouterr().out
    # a run name holding another model's results is refused
    with pytest.raises(UserError, match="holds roostformer results"):
        done_pairs(scores, "wrenformer")


def test_new_folds_join_a_run_only_at_its_recipe(monkeypatch, tmp_path, capsys):
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    scores = tmp_path / "model_scores" / "run.json"
    entry = {"mae": 1.0, "params": {**DEFAULTS, "model": "roostformer", "epochs": 30}}
    update_json_results(scores, lambda d: d.update({"matbench_steels": {
        "fold_0": entry}}))
    argv = ["--model", "roostformer", "--run-name", "run", "--tasks",
            "matbench_steels", "--out-dir", str(tmp_path), "--only-missing",
            "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "epochs 30 (this run: 300)" in err and err.count("\n") == 1
    assert main([*argv, "--epochs", "30"]) == 0
    assert script_pairs(capsys.readouterr().out) == [
        ("matbench_steels", f) for f in (1, 2, 3, 4)]


def test_wrong_shape_results_file_is_refused(monkeypatch, tmp_path, capsys):
    fake_featurized(monkeypatch, tmp_path, "matbench_steels")
    scores = tmp_path / "model_scores" / "run.json"
    scores.parent.mkdir()
    scores.write_text('{"matbench_steels": 5}')
    assert main(["--model", "roostformer", "--run-name", "run", "--tasks",
                 "matbench_steels", "--out-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is not a results file" in err and err.count("\n") == 1


def test_per_task_elements_train_their_folds_together(monkeypatch, tmp_path, capsys):
    for task in TASKS:
        fake_featurized(monkeypatch, tmp_path, task)
    assert main(["--model", "roostformer", "--run-name", "pt", "--tasks", *TASKS,
                 "--folds", "3", "1", "--per-task", "--ensemble", "2",
                 "--out-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--array=0-1 " in out
    assert "'matbench_steels 1 3'" in out and "'matbench_jdft2d 1 3'" in out
    assert 'read -r TASK FOLDS <<<' in out
    assert '--task "$TASK" --folds $FOLDS ' in out and "--ensemble 2" in out


# --- against a real SLURM cluster -------------------------------------------------
def submit(*args: str) -> tuple[str, str]:
    """Run slurm_submit.py for real; return (job id, the job script's text)."""
    result = subprocess.run([*SUBMIT, *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), result.stdout
    script = re.search(r"script: (\S+)", result.stdout).group(1)
    return job_id, Path(script).read_text()


def wait(cluster: LocalSlurmCluster, job_id: str, log_dir: Path,
         timeout: float = 400) -> None:
    """Wait for a job array to leave the queue; show its logs if it does not."""
    try:
        cluster.wait_for_jobs(job_id, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"job {job_id} did not finish:\n{logs(log_dir, job_id)}")


def logs(log_dir: Path, job_id: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted(log_dir.glob(f"*-{job_id}_*.log")))


def cluster_args(cluster: LocalSlurmCluster) -> list[str]:
    """sbatch flags for the local node: CPU only, the node runs two elements at
    once, elements use this Python (--pre-cmd)."""
    return ["--gpus-per-node", "0", "--cpus-per-task", str(max(1, cluster.cpus // 2)),
            "--mem", "1G", "--time", "00:15:00",
            "--pre-cmd", f"export PATH={shlex.quote(str(Path(sys.executable).parent))}"
            ":$PATH"]


def test_array_merges_every_fold_and_only_missing_resubmits_the_rest(
        slurm_cluster, featurized, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    featurized(*TASKS)
    out = tmp_path / "out"
    log_dir = out / "job-logs"
    common = ["--model", "roostformer", "--run-name", "e2e", "--tasks", *TASKS,
              "--epochs", "1", *TINY, "--out-dir", str(out), *cluster_args(cluster)]
    job_id, script = submit(*common)
    assert script_pairs(script) == [(t, f) for t in TASKS for f in range(5)]
    # 10 elements, the node runs 2 at once: most wait their turn
    queue = cluster.run("squeue", "-h", "-r", "-j", job_id, "-o", "%T").stdout
    assert queue.count("RUNNING") <= 2 and "PENDING" in queue, queue
    wait(cluster, job_id, log_dir)
    scores = read_json_results(out / "model_scores" / "e2e.json")
    preds = read_run_preds(out / "model_preds", "e2e")
    task_ids = set()
    for task in TASKS:
        assert sorted(scores.get(task, {})) == [f"fold_{f}" for f in range(5)], (
            logs(log_dir, job_id))
        for fold in range(5):
            entry, pred = scores[task][f"fold_{fold}"], preds[task][f"fold_{fold}"]
            assert entry["mae"] >= 0 and entry["epochs"] == 1
            params = entry["params"]
            assert params["run_name"] == "e2e"
            assert params["slurm_array_job_id"] == job_id
            assert params["slurm_job_id"].isdigit()
            task_ids.add(int(params["slurm_array_task_id"]))
            assert script_pairs(script)[int(params["slurm_array_task_id"])] == (
                task, fold)
            assert pred["mbid"] == get_fold_ids(task, fold)[1]  # nothing lost
            assert len(pred["prediction"]) == len(pred["target"]) == len(pred["mbid"])
    assert task_ids == set(range(10))
    assert len(list(log_dir.glob(f"e2e-{job_id}_*.log"))) == 10

    # lose three folds, then resubmit exactly those
    lost = [("matbench_steels", 1), ("matbench_jdft2d", 3), ("matbench_jdft2d", 4)]

    def drop(data: dict) -> None:
        for task, fold in lost:
            del data[task][f"fold_{fold}"]

    update_json_results(out / "model_scores" / "e2e.json", drop)
    job_2, script_2 = submit(*common, "--only-missing")
    assert script_pairs(script_2) == lost and "--array=0-2 " in script_2
    wait(cluster, job_2, log_dir)
    scores = read_json_results(out / "model_scores" / "e2e.json")
    for task in TASKS:
        for fold in range(5):
            params = scores[task][f"fold_{fold}"]["params"]
            assert params["slurm_array_job_id"] == (
                job_2 if (task, fold) in lost else job_id), logs(log_dir, job_2)
    result = subprocess.run([*SUBMIT, *common, "--only-missing"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "nothing to submit" in result.stdout


def test_per_task_array_runs_stacked_folds(slurm_cluster, featurized,  # noqa: F811
                                           tmp_path):
    """--per-task: one element per task trains its folds in one process."""
    cluster = slurm_cluster
    featurized("matbench_steels")
    out = tmp_path / "out"
    job_id, script = submit("--model", "roostformer", "--run-name", "pt", "--tasks",
                            "matbench_steels", "--folds", "0", "4", "--per-task",
                            "--ensemble", "2", "--epochs", "1", *TINY, "--out-dir",
                            str(out), *cluster_args(cluster))
    assert "--array=0-0 " in script
    wait(cluster, job_id, out / "job-logs")
    scores = read_json_results(out / "model_scores" / "pt.json")["matbench_steels"]
    assert sorted(scores) == ["fold_0", "fold_4"], logs(out / "job-logs", job_id)
    for entry in scores.values():
        assert entry["params"]["stacked_members"] == 4 and entry["ensemble"] == 2
        assert entry["params"]["slurm_array_task_id"] == "0"


def test_sbatch_rejection_shows_its_message(
        slurm_cluster, featurized, tmp_path):  # noqa: F811
    featurized("matbench_steels")
    result = subprocess.run(
        [*SUBMIT, "--model", "roostformer", "--run-name", "rej", "--tasks",
         "matbench_steels", "--out-dir", str(tmp_path), "--gpus-per-node", "0",
         "--partition", "no-such-partition"], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    assert "sbatch rejected the job" in result.stderr
    assert "partition" in result.stderr.lower()
    assert not list(tmp_path.glob("job-logs/*.sh"))  # nothing submitted, no script


def test_requeued_element_resumes_from_its_checkpoint(
        slurm_cluster, featurized, tmp_path):  # noqa: F811
    """USR1 is what sbatch --signal sends before the time limit: the element
    checkpoints, requeues itself and the second run resumes where the first left."""
    cluster = slurm_cluster
    featurized("matbench_steels")
    out = tmp_path / "out"
    epochs = 30
    job_id, _ = submit("--model", "roostformer", "--run-name", "rq", "--tasks",
                       "matbench_steels", "--folds", "2", "--epochs", str(epochs),
                       *TINY, "--out-dir", str(out), "--requeue", "--grace", "60",
                       *cluster_args(cluster))
    ckpt = out / "checkpoints" / "rq" / "matbench_steels-fold_2.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists():  # saved every 10 epochs
        assert time.monotonic() < deadline, logs(out / "job-logs", job_id)
        time.sleep(1)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{job_id}_0")
    wait(cluster, job_id, out / "job-logs")
    log = logs(out / "job-logs", job_id)
    first, resumed = re.search(r"stopped by SIGTERM after epoch (\d+)", log), re.search(
        r"resuming matbench_steels fold_2 from epoch (\d+)", log)
    assert first and resumed and first.group(1) == resumed.group(1), log
    assert 10 <= int(resumed.group(1)) < epochs, log
    assert "restart 1" in log and "requeueing job" in log
    entry = read_json_results(out / "model_scores" / "rq.json")["matbench_steels"][
        "fold_2"]
    assert entry["epochs"] == epochs and entry["params"]["slurm_array_job_id"] == job_id
    show = cluster.run("scontrol", "show", "job", job_id).stdout
    assert "Restarts=1" in show and "JobState=COMPLETED" in show, show
    assert read_run_preds(out / "model_preds", "rq")["matbench_steels"]
