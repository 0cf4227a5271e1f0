"""make_submission.py on results that run_matbench.py produces here: a folder that
matbench itself reloads as valid, with a truly gzip-compressed results file,
Matbench's info.json fields and the source; incomplete tasks reported; errors."""

import gzip
import json
from pathlib import Path

import pytest
from run_files import write_run

from mat_bench.data import preds_file, read_json_results, read_run_preds, write_json
from mat_bench.leaderboard import load_runs, score_results
from mat_bench.make_submission import INFO_FIELDS, load_submission, make_submission
from mat_bench.make_submission import main as submission_main

STEELS, IS_METAL = "matbench_steels", "matbench_expt_is_metal"
RUN = "roost-test"  # the run of conftest.py's real_run fixture


def partial_copy(src: Path, dest: Path, task: str, keep: int) -> Path:
    """A copy of the real run that keeps only the first `keep` folds of `task`."""
    scores = read_json_results(src / "model_scores" / f"{RUN}.json")
    preds = read_run_preds(src / "model_preds", RUN)
    for data in (scores, preds):
        data[task] = {k: v for k, v in data[task].items() if int(k[-1]) < keep}
        if not data[task]:
            data.pop(task)
    return write_run(dest, RUN, scores, preds)


def run_cli(argv, capsys):
    code = submission_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_submission_is_valid_for_matbench(real_run, tmp_path, capsys):
    folder = tmp_path / "matbench_v0.1_Roostformer"
    code, out, err = run_cli(["--run", RUN, "--scores-dir", real_run / "model_scores",
                              "--preds-dir", real_run / "model_preds", "--out-dir",
                              folder, "--authors", "A. Tester"], capsys)
    assert code == 0, err
    assert "2 task(s)" in out and not err
    results = folder / "results.json.gz"
    assert results.read_bytes()[:2] == b"\x1f\x8b"  # really gzip
    # matbench's own loader, the way the leaderboard reads submissions
    from matbench.bench import MatbenchBenchmark

    with gzip.open(results, "rt") as file:
        bench = MatbenchBenchmark.from_dict(json.load(file))
    assert bench.validate() == {} and bench.is_recorded
    assert sorted(bench.tasks_map) == [IS_METAL, STEELS]
    # matbench's scores of the recorded predictions are ours
    (run,) = load_runs(real_run / "model_scores", real_run / "model_preds")
    ours = score_results([run]).set_index(["task", "fold"])
    for fold in range(5):
        fold_key = f"fold_{fold}"
        steels = bench.tasks_map[STEELS].results[fold_key]
        assert steels.scores.mae == pytest.approx(ours.loc[(STEELS, fold), "mae"])
        metal = bench.tasks_map[IS_METAL].results[fold_key]
        assert metal.scores.rocauc == pytest.approx(ours.loc[(IS_METAL, fold),
                                                             "rocauc"])
        assert all(isinstance(p, float) and 0 <= p <= 1 for p in metal.data.values())
    info = json.loads((folder / "info.json").read_text())
    assert set(INFO_FIELDS) <= set(info)
    assert all(isinstance(info[k], str) and info[k] for k in INFO_FIELDS)
    assert info["authors"] == "A. Tester" and info["algorithm"] == "Roostformer"
    assert "@article" in info["bibtex_refs"] and "matbench==" in info["requirements"]
    for name in ("run_matbench.py", "make_submission.py", "data.py"):
        assert (folder / name).is_file()
    matbench_submission_checks(folder)


def matbench_submission_checks(folder):
    """What the matbench repository's scripts/test_submission.py checks of each
    benchmarks/ entry (the check a Matbench pull request runs)."""
    from mat_bench.make_submission import load_submission

    info = json.loads((folder / "info.json").read_text())
    assert "notes" in info
    for field in ("authors", "algorithm", "algorithm_long", "bibtex_refs",
                  "requirements"):
        assert info.get(field)
    assert load_submission(folder).is_valid
    assert list(folder.glob("*.ipynb")) + list(folder.glob("*.py"))
    for path in folder.iterdir():
        if path.name != "results.json.gz":
            assert path.stat().st_size / 1e6 <= 10, path


def test_incomplete_task_is_reported_not_dropped(real_run, tmp_path, capsys):
    src = partial_copy(real_run, tmp_path / "run", IS_METAL, keep=3)
    folder = tmp_path / "sub"
    code, out, err = run_cli(["--run", RUN, "--scores-dir", src / "model_scores",
                              "--preds-dir", src / "model_preds", "--out-dir", folder],
                             capsys)
    assert code == 0
    assert f"warning: {IS_METAL} has 3/5 folds: run folds 3, 4" in err
    assert "edit 'authors'" in err  # no --authors: a placeholder, said out loud
    assert f"not included (incomplete): {IS_METAL}" in out
    bench = load_submission(folder)
    assert list(bench.tasks_map) == [STEELS]
    info = json.loads((folder / "info.json").read_text())
    assert f"{IS_METAL} (3/5 folds)" in info["notes"]


def test_rerun_replaces_a_previous_submission(real_run, tmp_path):
    folder = tmp_path / "sub"
    src = partial_copy(real_run, tmp_path / "run", IS_METAL, keep=0)
    make_submission(RUN, folder, src / "model_scores", src / "model_preds", "A")
    assert list(load_submission(folder).tasks_map) == [STEELS]
    make_submission(RUN, folder, real_run / "model_scores", real_run / "model_preds",
                    "A")
    assert sorted(load_submission(folder).tasks_map) == [IS_METAL, STEELS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sub"]  # no debris


def test_rerun_keeps_the_users_own_files(real_run, tmp_path, capsys):
    folder = tmp_path / "sub"
    argv = ["--run", RUN, "--scores-dir", real_run / "model_scores", "--preds-dir",
            real_run / "model_preds", "--out-dir", folder, "--authors", "A"]
    assert run_cli(argv, capsys)[0] == 0
    (folder / "NOTES.txt").write_text("mine")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.csv").write_text("a,b")
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "kept your other files" in err and "NOTES.txt" in err
    assert (folder / "NOTES.txt").read_text() == "mine"
    assert (folder / "extra" / "data.csv").read_text() == "a,b"
    matbench_submission_checks(folder)


def test_no_complete_task(real_run, tmp_path, capsys):
    src = partial_copy(real_run, tmp_path / "run", STEELS, keep=2)
    src = partial_copy(src, src, IS_METAL, keep=1)
    code, _, err = run_cli(["--run", RUN, "--scores-dir", src / "model_scores",
                            "--preds-dir", src / "model_preds", "--out-dir",
                            tmp_path / "sub"], capsys)
    assert code == 2 and err.startswith("error: run 'roost-test' has no task with all")
    assert STEELS in err and IS_METAL in err and err.count("\n") == 1
    assert not (tmp_path / "sub").exists()


def test_unknown_run(real_run, tmp_path, capsys):
    code, _, err = run_cli(["--run", "nope", "--scores-dir", real_run / "model_scores",
                            "--preds-dir", real_run / "model_preds", "--out-dir",
                            tmp_path / "sub"], capsys)
    assert code == 2 and "no run 'nope'" in err and RUN in err


def test_refuses_a_folder_that_is_not_a_submission(real_run, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["--run", RUN, "--scores-dir", real_run / "model_scores",
                            "--preds-dir", real_run / "model_preds", "--out-dir",
                            tmp_path], capsys)
    assert code == 2 and "not a submission folder" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_tampered_results_are_invalid(real_run, tmp_path):
    folder = tmp_path / "sub"
    make_submission(RUN, folder, real_run / "model_scores", real_run / "model_preds",
                    "A")
    with gzip.open(folder / "results.json.gz", "rt") as file:
        data = json.load(file)
    fold = data["tasks"][STEELS]["results"]["fold_0"]["data"]
    fold[next(iter(fold))] += 1.0
    with gzip.open(folder / "results.json.gz", "wt") as file:
        json.dump(data, file)
    from mat_bench.data import UserError

    with pytest.raises(UserError, match="not a valid matbench results file"):
        load_submission(folder)


def test_labels_at_a_validation_threshold_are_submitted_as_labels(real_run, tmp_path,
                                                                   capsys):
    """A run whose labels are not its probabilities above 0.5 (a threshold chosen
    on validation) submits the labels, so that matbench scores what we scored."""
    src = partial_copy(real_run, tmp_path / "run", IS_METAL, keep=5)
    path = preds_file(src / "model_preds", RUN, IS_METAL)
    preds = read_json_results(path)
    fold = preds[IS_METAL]["fold_0"]
    fold["prediction"] = [int(p > 0.3) for p in fold["probability"]]
    assert any(int(p > 0.5) != label for p, label in zip(fold["probability"],
                                                         fold["prediction"],
                                                         strict=True))
    write_json(path, preds)
    folder = tmp_path / "sub"
    code, _, err = run_cli(["--run", RUN, "--scores-dir", src / "model_scores",
                            "--preds-dir", src / "model_preds", "--out-dir", folder,
                            "--authors", "A"], capsys)
    assert code == 0, err
    bench = load_submission(folder)
    (run,) = load_runs(src / "model_scores", src / "model_preds")
    ours = score_results([run]).set_index(["task", "fold"])
    for fold_idx in range(5):
        result = bench.tasks_map[IS_METAL].results[f"fold_{fold_idx}"]
        assert result.scores.rocauc == pytest.approx(ours.loc[(IS_METAL, fold_idx),
                                                              "rocauc"])
        kinds = {type(v) for v in result.data.values()}
        assert kinds == ({bool} if fold_idx == 0 else {float})
