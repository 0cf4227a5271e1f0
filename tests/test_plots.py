"""make_plots.py, plotting_functions.py and leaderboard.py on the real Matbench
leaderboard in ../shared and on results that run_matbench.py produces here:
published scores reproduced, every figure written (HTML and PNG), the heatmap's
ordering, the ranked table, and each user error."""

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from run_files import write_run

from mat_bench.data import preds_file, read_json_results, read_run_preds, write_json
from mat_bench.leaderboard import (
    BENCHMARKS_ENV,
    leaderboard_fold_scores,
    load_runs,
    read_entry,
    score_results,
    task_scores,
)
from mat_bench.make_plots import main as plots_main
from mat_bench.make_plots import make_plots
from mat_bench.plotting_functions import (
    COMMON_MEAN,
    OWN_MEAN,
    heatmap_figure,
    heatmap_table,
)

STEELS, IS_METAL = "matbench_steels", "matbench_expt_is_metal"
TASKS = [STEELS, IS_METAL]
RUN = "roost-test"  # the run of conftest.py's real_run fixture
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def benchmarks() -> Path:
    import os

    path = os.environ.get(BENCHMARKS_ENV)
    if not path or not Path(path).is_dir():
        pytest.skip(f"the Matbench leaderboard is not available (${BENCHMARKS_ENV})")
    return Path(path)


def copy_run(src: Path, dest: Path, drop: dict[str, list[str]] | None = None,
             drop_preds_task: str | None = None) -> Path:
    """A copy of a real run, without some folds (a partial run) or without one
    task's predictions."""
    scores = read_json_results(src / "model_scores" / f"{RUN}.json")
    preds = read_run_preds(src / "model_preds", RUN)
    for data in (scores, preds):
        for task, folds in (drop or {}).items():
            for fold in folds:
                data[task].pop(fold)
    if drop_preds_task:
        preds.pop(drop_preds_task)
    return write_run(dest, RUN, scores, preds)


@pytest.fixture(scope="session")
def plots(real_run, tmp_path_factory):
    """make_plots on the real run made partial (expt_is_metal folds 3, 4 dropped)."""
    src = copy_run(real_run, tmp_path_factory.mktemp("partial"),
                   drop={IS_METAL: ["fold_3", "fold_4"]})
    out_dir = tmp_path_factory.mktemp("plots")
    result = make_plots(src / "model_scores", src / "model_preds", benchmarks(),
                        out_dir, tasks=TASKS)
    return out_dir, result


# --- the published leaderboard ----------------------------------------------------
def test_published_scores_reproduced():
    folder = benchmarks()
    fold_scores = leaderboard_fold_scores(folder, ["matbench_expt_gap", IS_METAL])
    per_task = task_scores(fold_scores).set_index(["name", "task"])
    assert per_task.loc[("CrabNet", "matbench_expt_gap"), "mae"] == pytest.approx(
        0.3463, abs=5e-5)
    assert per_task.loc[("Dummy", "matbench_expt_gap"), "mae"] == pytest.approx(
        1.1435, abs=5e-5)
    assert per_task.loc[("Dummy", "matbench_expt_gap"), "scaled_error"] == \
        pytest.approx(1.0, abs=1e-3)
    assert per_task.loc[("AMMExpress v2020", IS_METAL), "rocauc"] == pytest.approx(
        0.9209, abs=5e-5)
    # every fold equals the score matbench recorded inside the entry's results file
    checked = 0
    for key, rows in fold_scores.groupby("key"):
        with gzip.open(folder / key / "results.json.gz", "rt") as file:
            recorded = json.load(file)["tasks"]
        for row in rows.itertuples():
            metric = "mae" if row.task == "matbench_expt_gap" else "rocauc"
            expected = recorded[row.task]["results"][f"fold_{row.fold}"]["scores"]
            assert getattr(row, metric) == pytest.approx(expected[metric], rel=1e-9)
            checked += 1
    assert checked >= 50


def test_probability_entries_scored_as_matbench_does():
    """coNGN recorded probabilities on mp_is_metal; matbench 0.6 thresholds them at
    0.5 before its ROC-AUC, and the published scores are those."""
    entry = benchmarks() / "matbench_v0.1_coNGN"
    scores = score_results([read_entry(entry, ["matbench_mp_is_metal"])])
    with gzip.open(entry / "results.json.gz", "rt") as file:
        recorded = json.load(file)["tasks"]["matbench_mp_is_metal"]["results"]
    for row in scores.itertuples():
        fold = recorded[f"fold_{row.fold}"]["scores"]
        assert row.rocauc == pytest.approx(fold["rocauc"], rel=1e-9)
        assert row.accuracy == pytest.approx(fold["accuracy"], rel=1e-9)
        assert row.rocauc_prob > row.rocauc + 0.03  # the probabilities rank better
    assert scores["rocauc"].mean() == pytest.approx(0.9089, abs=5e-5)


def test_leaderboard_cache_gives_the_same_scores(tmp_path):
    folder = benchmarks()
    cache = tmp_path / "cache.json"
    fresh = leaderboard_fold_scores(folder, [STEELS], cache)
    assert cache.is_file() and fresh["key"].nunique() >= 8
    cached = leaderboard_fold_scores(folder, [STEELS], cache)
    pd.testing.assert_frame_equal(fresh, cached)
    cache.write_text("{not json")  # a damaged cache is rebuilt, not fatal
    pd.testing.assert_frame_equal(fresh, leaderboard_fold_scores(folder, [STEELS],
                                                                 cache))


# --- our runs ---------------------------------------------------------------------
def test_our_scores_match_run_matbench(real_run):
    (run,) = load_runs(real_run / "model_scores", real_run / "model_preds")
    per_fold = score_results([run]).set_index(["task", "fold"])
    recorded = read_json_results(real_run / "model_scores" / f"{RUN}.json")
    # one name, one meaning: the leaderboard's scores are those run_matbench records
    for task, metric in ((STEELS, "mae"), (IS_METAL, "rocauc"),
                         (IS_METAL, "rocauc_prob"), (IS_METAL, "accuracy")):
        for fold in range(5):
            assert per_fold.loc[(task, fold), metric] == pytest.approx(
                recorded[task][f"fold_{fold}"][metric], rel=1e-6)


def test_figures_and_report_written(plots):
    out_dir, result = plots
    stems = ["leaderboard", "heatmap", "parity_steels", "roc_expt_is_metal",
             "fold_spread"]
    for stem in stems:
        html = out_dir / f"{stem}.html"
        png = out_dir / f"{stem}.png"
        assert html.stat().st_size > 1000 and "plotly.min.js" in html.read_text()
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == PNG_MAGIC
    assert (out_dir / "plotly.min.js").stat().st_size > 1_000_000
    report = (out_dir / "index.html").read_text()
    assert report.count('class="figure"') == len(stems)
    assert "Roostformer (roost-test)" in report and "3/5 (partial)" in report
    assert not list(out_dir.glob(".*.tmp"))  # nothing half-written left behind


def test_table_ranks_our_rows_among_published(plots):
    out_dir, result = plots
    table = pd.read_csv(out_dir / "leaderboard.csv")
    assert list(table["task"].unique()) == TASKS
    for _, sub in table.groupby("task"):
        assert list(sub["rank"]) == list(range(1, len(sub) + 1))
        assert sub["scaled_error"].is_monotonic_increasing
        ours = sub[sub["source"] == "ours"]
        assert list(ours["model"]) == ["Roostformer (roost-test)"]
        assert len(sub) >= 6  # ranked among the published entries
    is_metal = table[(table["task"] == IS_METAL) & (table["source"] == "ours")]
    assert is_metal["folds"].item() == "3/5"
    markdown = (out_dir / "leaderboard.md").read_text()
    assert "**Roostformer (roost-test)**" in markdown
    assert "## matbench_steels" in markdown


def test_whole_leaderboard_ranks_entries_without_predictions(plots):
    """Entries known by their published scores only (leaderboard_scores.csv beside
    the benchmarks folder) are ranked with the rest and marked; the README table
    ranks our run as "k of N" among every published entry, next to the best
    composition-only one."""
    out_dir, result = plots
    csv = pd.read_csv(benchmarks().parent / "leaderboard_scores.csv")
    table = pd.read_csv(out_dir / "leaderboard.csv")
    steels = table[table["task"] == STEELS]
    modnet = steels[steels["model"] == "MODNet (v0.1.12) (scores only)"]
    assert modnet["source"].item() == "scores only"
    assert modnet["mean"].item() == pytest.approx(87.7627)
    # every published steels entry once: scored from predictions or by its score
    published = steels[steels["source"] != "ours"]
    assert len(published) == (csv["task"] == STEELS).sum()
    loaded = set(result["per_task"].query("source == 'matbench'")["key"])
    assert not set(result["per_task"].query("source == 'scores only'")["key"]) & loaded
    ours = steels[steels["source"] == "ours"].iloc[0]
    rank = 1 + int((published["scaled_error"] < ours["scaled_error"]).sum())
    results = (out_dir / "results.md").read_text()
    # the test run's tiny model is not at the defaults: it is history
    assert results.index("Earlier runs") < results.index(f"| {STEELS}")
    row = next(line for line in results.splitlines() if line.startswith(f"| {STEELS}"))
    assert f"| {rank} of {len(published) + 1} |" in row
    # the partial run (3 of 5 folds) is ranked, but marked provisional
    partial = next(line for line in results.splitlines()
                   if line.startswith(f"| {IS_METAL}"))
    assert "| 3/5 |" in partial and " (provisional) |" in partial
    assert "(provisional)" not in row
    best = published.iloc[0]  # on a composition task every entry is composition-only
    assert row.count(f"{best['model']} {best['mean']:.4g}") == 2
    html = (out_dir / "leaderboard.html").read_text()
    assert "MODNet (v0.1.12) (scores only)" in html


def test_composition_only_entries():
    from mat_bench.leaderboard import is_composition_only

    assert is_composition_only("CrabNet", "matbench_phonons")
    assert is_composition_only("Finder_v1.2 composition-only version (scores only)",
                               "matbench_mp_gap")
    assert not is_composition_only("coGN (scores only)", "matbench_mp_gap")
    assert is_composition_only("MODNet (v0.1.12) (scores only)", STEELS)
    assert not is_composition_only("Dummy", STEELS)


def test_missing_leaderboard_scores_file_says_what_to_do(real_run, tmp_path, capsys):
    code, err = run_cli(["--scores-dir", real_run / "model_scores", "--preds-dir",
                         real_run / "model_preds", "--tasks", STEELS, "--out-dir",
                         tmp_path / "out", "--leaderboard-scores",
                         tmp_path / "none.csv", "--no-png"], capsys)
    assert code == 2 and "--leaderboard-scores" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_heatmap_sorted_by_the_mean_over_common_tasks(plots):
    _, result = plots
    table = result["heatmap"]
    task_cols = [c for c in table.columns if c.startswith("matbench_")]
    common = [c for c in task_cols if table[c].notna().all()]
    assert STEELS in common and "Roostformer (roost-test)" in table.index
    assert table[COMMON_MEAN].tolist() == sorted(table[COMMON_MEAN])
    assert table[COMMON_MEAN].to_numpy() == pytest.approx(
        table[common].mean(axis=1).to_numpy())
    assert table.index[-1] == "Dummy"


def test_heatmap_ordering_rules():
    per_task = pd.DataFrame(
        [("A", "matbench_steels", 0.2), ("A", "matbench_glass", 0.9),
         ("B", "matbench_steels", 0.3), ("C", "matbench_steels", 0.25),
         ("C", "matbench_glass", 0.1)],
        columns=["name", "task", "scaled_error"]).assign(
            source="matbench", key="k", n_folds=5)
    table, common = heatmap_table(per_task)
    assert common == ["matbench_steels"]  # glass is missing for B
    assert list(table.index) == ["A", "C", "B"]  # by steels, not by own mean
    assert table.loc["A", OWN_MEAN] == pytest.approx(0.55)
    fig = heatmap_figure(per_task)
    assert list(fig.data[0].y) == ["A", "C", "B"]
    # with no common task, the mean over each model's own tasks decides
    disjoint = pd.DataFrame(
        [("A", "matbench_steels", 0.2), ("A", "matbench_glass", 0.9),
         ("C", "matbench_jdft2d", 0.5)], columns=["name", "task", "scaled_error"])
    table, common = heatmap_table(disjoint)
    assert common == [] and table[COMMON_MEAN].isna().all()
    assert list(table.index) == ["C", "A"]  # 0.5 < 0.55


# --- errors -----------------------------------------------------------------------
def run_cli(argv, capsys):
    code = plots_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_empty_scores_folder(tmp_path, capsys):
    (tmp_path / "scores").mkdir()
    code, err = run_cli(["--scores-dir", tmp_path / "scores", "--preds-dir", tmp_path,
                         "--benchmarks-dir", benchmarks(), "--out-dir",
                         tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error: no run scores") and "\n" == err[-1]
    assert not (tmp_path / "out").exists()


def test_predictions_missing_for_a_task_with_scores(real_run, tmp_path, capsys):
    src = copy_run(real_run, tmp_path / "run", drop_preds_task=IS_METAL)
    code, err = run_cli(["--scores-dir", src / "model_scores", "--preds-dir",
                         src / "model_preds", "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and "no predictions" in err and IS_METAL in err
    assert not (tmp_path / "out").exists()


def test_wrong_shape_scores_file_is_refused(real_run, tmp_path, capsys):
    src = copy_run(real_run, tmp_path / "run")
    (src / "model_scores" / f"{RUN}.json").write_text('{"matbench_steels": [1, 2]}')
    code, err = run_cli(["--scores-dir", src / "model_scores", "--preds-dir",
                         src / "model_preds", "--out-dir", tmp_path / "out",
                         "--no-png"], capsys)
    assert code == 2 and "is not a results file" in err and "--run-name" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_non_finite_predictions_name_the_fold(real_run, tmp_path, capsys):
    src = copy_run(real_run, tmp_path / "run")
    path = preds_file(src / "model_preds", RUN, STEELS)
    data = read_json_results(path)
    data[STEELS]["fold_2"]["prediction"][0] = None
    write_json(path, data)
    code, err = run_cli(["--scores-dir", src / "model_scores", "--preds-dir",
                         src / "model_preds", "--tasks", STEELS, "--out-dir",
                         tmp_path / "out", "--no-png"], capsys)
    assert code == 2 and "non-finite predictions" in err and "fold_2" in err
    assert err.count("\n") == 1


def test_unknown_run_name(real_run, tmp_path, capsys):
    code, err = run_cli(["--scores-dir", real_run / "model_scores", "--preds-dir",
                         real_run / "model_preds", "--runs", "nope", "--out-dir",
                         tmp_path / "out"], capsys)
    assert code == 2 and "no run 'nope'" in err and RUN in err


def test_unknown_peer(real_run, tmp_path, capsys):
    code, err = run_cli(["--scores-dir", real_run / "model_scores", "--preds-dir",
                         real_run / "model_preds", "--peers", "NoSuchModel",
                         "--tasks", STEELS, "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and "unknown --peers NoSuchModel" in err and "CrabNet" in err


@pytest.mark.parametrize("case", ["missing", "empty", "unset"])
def test_bad_benchmarks_folder(case, real_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(BENCHMARKS_ENV, raising=False)
    argv = ["--scores-dir", real_run / "model_scores", "--preds-dir",
            real_run / "model_preds", "--out-dir", tmp_path / "out"]
    if case == "missing":
        argv += ["--benchmarks-dir", tmp_path / "nowhere"]
    elif case == "empty":
        (tmp_path / "bench" / "matbench_v0.1_x").mkdir(parents=True)
        argv += ["--benchmarks-dir", tmp_path / "bench"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("error: ")
    expected = {"missing": "does not exist", "empty": "holds no",
                "unset": "--benchmarks-dir or set MATBENCH_BENCHMARKS_DIR"}[case]
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_env_var_names_the_leaderboard(real_run, tmp_path, capsys, monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(benchmarks() / "matbench_v0.1_dummy", bench / "matbench_v0.1_dummy")
    monkeypatch.setenv(BENCHMARKS_ENV, str(bench))
    code = plots_main(["--scores-dir", str(real_run / "model_scores"), "--preds-dir",
                       str(real_run / "model_preds"), "--out-dir", str(tmp_path / "o"),
                       "--tasks", STEELS, "--no-png"])
    out = capsys.readouterr().out
    assert code == 0 and ">>" in out and "Dummy" in out
    assert (tmp_path / "o" / "index.html").is_file()
    assert not list((tmp_path / "o").glob("*.png"))
