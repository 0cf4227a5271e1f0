"""Compare our Roostformer and Wrenformer runs with the published Matbench
leaderboard: figures (interactive HTML and PNG), the leaderboard table (terminal,
CSV, Markdown) and one HTML report page, OUT_DIR/index.html, showing them all.

Examples:
    python make_plots.py                      # every run in model_scores/
    python make_plots.py --runs roostformer-steels wrenformer-phonons
    python make_plots.py --benchmarks-dir ../shared/matbench/benchmarks --out-dir plots
    python make_plots.py --peers CrabNet "RF-SCM/Magpie" --no-png

Our runs are read from model_scores/ (which folds exist, run parameters) and
model_preds/ (test predictions); a run may be partial (missing folds), and is shown
as such. The leaderboard is a clone of the matbench repository's benchmarks/ folder
(--benchmarks-dir or $MATBENCH_BENCHMARKS_DIR). Every model, ours and published, is
scored from its recorded predictions on Matbench's folds by the same code; the
published scores are cached in OUT_DIR/leaderboard_cache.json. Published entries
whose predictions are not in that folder (MODNet, coGN, the kgcnn models, ...) come
from the whole leaderboard's scores (--leaderboard-scores, by default
leaderboard_scores.csv beside the benchmarks folder): they are ranked in the tables,
the scaled-error figure and the heatmap by their published mean, and named
"... (scores only)"; they have no parity or ROC plots. The README table ranks each
of our runs as "k of N" among all published entries and itself, next to the best
published entry, the best composition-only entry and CrabNet.

Outputs in OUT_DIR: index.html (the report), leaderboard.{csv,md}, and .html/.png of
leaderboard (scaled error per task), heatmap (models x tasks), parity_<task>
(regression), roc_<task> (classification) and fold_spread.
"""

from __future__ import annotations

import argparse
import datetime
import html
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mat_bench import ALL_TASKS, N_FOLDS, ROOT, TASK_INFO
from mat_bench.data import ArgumentParser, UserError, atomic_path, check_task
from mat_bench.leaderboard import (
    BENCHMARKS_ENV,
    DEFAULT_PREDS_DIR,
    DEFAULT_SCORES_DIR,
    LEADERBOARD_SCORES_ENV,
    LEADERBOARD_SCORES_FILE,
    MATBENCH,
    OURS,
    Results,
    benchmarks_dir,
    is_composition_only,
    leaderboard_fold_scores,
    leaderboard_scores_path,
    load_leaderboard,
    load_runs,
    rank_table,
    score_results,
    scores_only_entries,
    task_scores,
)
from mat_bench.plotting_functions import (
    METRIC_LABELS,
    PLOTLY_JS,
    fold_spread_figure,
    heatmap_figure,
    heatmap_table,
    leaderboard_figure,
    parity_figure,
    roc_figure,
    short_task,
    write_figures,
)
from mat_bench.runs import at_defaults

# --- defaults, in one place -------------------------------------------------------
DEFAULT_OUT_DIR = os.path.join(ROOT, "plots")
CACHE_FILE = "leaderboard_cache.json"  # published scores, recomputed when stale
N_DEFAULT_PEERS = 2  # parity/ROC peers per task: the best published entries


# --- choosing what to show --------------------------------------------------------
def our_tasks(runs: list[Results]) -> list[str]:
    """Tasks that at least one of our runs has, in Matbench order."""
    present = {task for run in runs for task in run.tasks}
    return [task for task in ALL_TASKS if task in present]


def heatmap_models(per_task: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Our runs plus the published entries that have at least half of `tasks`
    (our tasks): enough overlap for a comparison."""
    need = math.ceil(len(tasks) / 2)
    shared = per_task[per_task["task"].isin(tasks)].groupby("name")["task"].nunique()
    ours = per_task.loc[per_task["source"] == OURS, "name"].unique().tolist()
    published = per_task.loc[per_task["source"] != OURS, "name"].unique()
    return ours + [name for name in published if shared.get(name, 0) >= need]


def choose_peers(per_task: pd.DataFrame, task: str, peers: list[str] | None
                 ) -> list[str]:
    """Published entries to draw beside ours on a task: those named in `peers`
    (algorithm or folder name) that have the task, else the best complete ones."""
    sub = per_task[(per_task["task"] == task) & (per_task["source"] == MATBENCH)]
    if peers is not None:
        return sub.loc[sub["name"].isin(peers) | sub["key"].isin(peers),
                       "name"].tolist()
    complete = sub[sub["n_folds"] == N_FOLDS].sort_values("scaled_error")
    return complete["name"].head(N_DEFAULT_PEERS).tolist()


# --- tables -----------------------------------------------------------------------
def run_summary(runs: list[Results]) -> pd.DataFrame:
    """One row per (run, task): model, folds present, epochs and device."""
    rows = []
    for run in runs:
        for task in run.tasks:
            entries = run.info["scores"][task].values()
            params = [e.get("params", {}) for e in entries]
            rows.append({
                "run": run.key, "model": run.name.split(" (")[0], "task": task,
                "folds": f"{len(entries)}/{N_FOLDS}"
                         + ("" if len(entries) == N_FOLDS else " (partial)"),
                "epochs": "/".join(sorted({str(e.get("epochs", "?"))
                                           for e in entries})),
                "device": "/".join(sorted({str(p.get("device", "?"))
                                           for p in params})),
            })
    return pd.DataFrame(rows)


def terminal_table(table: pd.DataFrame) -> str:
    """The ranked leaderboard per task as plain text; our rows marked with >>."""
    blocks = []
    for task, sub in table.groupby("task", sort=False):
        metric = METRIC_LABELS[sub["metric"].iloc[0]]
        text = pd.DataFrame({
            "": [">>" if s == OURS else "" for s in sub["source"]],
            "rank": sub["rank"], "model": sub["model"], "folds": sub["folds"],
            metric: [f"{m:.4g} ± {s:.2g}" for m, s in zip(sub["mean"], sub["std"],
                                                               strict=True)],
            "scaled error": [f"{v:.4f}" for v in sub["scaled_error"]],
        })
        if sub["rocauc_prob"].notna().any():
            text[PROB_LABEL] = [_fmt(v) for v in sub["rocauc_prob"]]
        text = text.to_string(index=False)
        blocks.append(f"{task} ({metric}; ranked by scaled error, lower is better)\n"
                      f"{text}")
    return "\n\n".join(blocks)


PROB_LABEL = "ROC-AUC of probabilities"
TABLE_NOTE = (
    "Scaled error: MAE / MAD of the target (regression) or (1 - ROC-AUC) / 0.5 "
    "(classification); mean ± std over the test folds. ROC-AUC is computed as "
    "matbench scores a submission (and as the published leaderboard shows it): "
    "from class labels (a published entry's probabilities above 0.5; our recorded "
    "labels, at a threshold chosen on validation where the run says so). "
    + PROB_LABEL + ": "
    "from the probabilities, where a model recorded them.")


def _fmt(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.4f}"


def markdown_table(table: pd.DataFrame) -> str:
    """The ranked leaderboard per task as Markdown; our rows in bold."""
    lines = ["# Matbench leaderboard with our runs", "", TABLE_NOTE, ""]
    for task, sub in table.groupby("task", sort=False):
        metric = METRIC_LABELS[sub["metric"].iloc[0]]
        prob = sub["rocauc_prob"].notna().any()
        lines += [f"## {task}", "",
                  f"| rank | model | folds | {metric} | scaled error |"
                  + (f" {PROB_LABEL} |" if prob else ""),
                  "| ---: | --- | ---: | ---: | ---: |" + (" ---: |" if prob else "")]
        for row in sub.itertuples():
            bold = "**" if row.source == OURS else ""
            lines.append(f"| {row.rank} | {bold}{row.model}{bold} | {row.folds} | "
                         f"{row.mean:.4g} ± {row.std:.2g} | {row.scaled_error:.4f} |"
                         + (f" {_fmt(row.rocauc_prob)} |" if prob else ""))
        lines.append("")
    return "\n".join(lines)


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def fmt(row: pd.Series) -> str:
    return f"{row['mean']:.4g}"


RESULTS_HEADER = [
    "| task | model | folds | ours | rank | best published | best composition-only "
    "| CrabNet | epochs | train time per fold | machine |",
    "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]


def results_markdown(table: pd.DataFrame, runs: list[Results]) -> str:
    """Our runs next to the leaderboard, one row per (task, run): our score, its rank,
    the best published entry and CrabNet, with epochs, training time per fold and the
    machine, all read from the result files. Rows trained at today's defaults
    (runs.at_defaults) come first; the others follow as the history."""
    current, history = [], []
    for run in runs:
        for task in run.tasks:
            entries = list(run.info["scores"][task].values())
            params = entries[0].get("params", {})
            row = result_row(table, run, task, entries)
            (current if at_defaults(params) else history).append(row)
    lines = ["Trained at today's defaults:", "", *RESULTS_HEADER,
             *(current or ["| – | none yet | | | | | | | | | |"])]
    if history:
        lines += ["", "Earlier runs, at other settings (history):", "",
                  *RESULTS_HEADER, *history]
    return "\n".join(lines)


def result_row(table: pd.DataFrame, run: Results, task: str, entries: list[dict]
               ) -> str:
    """One row of the results table."""
    sub = table[table["task"] == task]
    ours = sub[(sub["source"] == OURS) & (sub["model"] == run.name)].iloc[0]
    published = sub[sub["source"] != OURS]
    best = published.iloc[0] if len(published) else None
    comp = published[[is_composition_only(m, task) for m in published["model"]]]
    best_comp = (f"{comp.iloc[0]['model']} {fmt(comp.iloc[0])}" if len(comp)
                 else "–")
    crabnet = published[published["model"] == "CrabNet"]
    # rank among the published entries and this run alone; a partial run's mean
    # is over fewer folds than theirs, so its rank is provisional
    rank = 1 + int((published["scaled_error"] < ours["scaled_error"]).sum())
    rank_cell = f"{rank} of {len(published) + 1}" + (
        " (provisional)" if len(entries) < N_FOLDS else "")
    spread = f"{ours['std']:.2g}" if len(entries) > 1 else "–"
    params = entries[0].get("params", {})
    # a stacked run (--folds) trains its folds at once: its time is theirs
    seconds = np.mean([e.get("train_seconds", np.nan)
                       / len(e.get("params", {}).get("folds", [None]))
                       for e in entries])
    machine = params.get("gpu") or (f"{params.get('device', '?')}, torch "
                                    f"{params.get('torch_version', '?')}")
    return (f"| {task} | {run.name} | {ours['folds']} | {fmt(ours)} ± {spread} | "
            f"{rank_cell} | "
            + (f"{best['model']} {fmt(best)}" if best is not None else "–")
            + f" | {best_comp} | {fmt(crabnet.iloc[0]) if len(crabnet) else '–'} | "
            f"{params.get('epochs', '?')} | {seconds:.0f} s | {machine} |")


def update_readme(readme: Path, text: str) -> None:
    """Replace what stands between the results markers of the README."""
    content = readme.read_text(encoding="utf-8")
    start, end = content.find(README_START), content.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"{readme} has no {README_START} ... {README_END} markers")
    write_text(readme, content[: start + len(README_START)] + "\n" + text + "\n"
               + content[end:])


def write_text(path: Path, text: str) -> Path:
    """Write a text file whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    return path


# --- figures and report -----------------------------------------------------------
def build_figures(runs: list[Results], published: list[Results],
                  fold_scores: pd.DataFrame, per_task: pd.DataFrame,
                  tasks: list[str], peers: list[str] | None) -> dict[str, go.Figure]:
    """All figures by file stem: leaderboard, heatmap, parity_<task> or
    roc_<task> per task, fold_spread."""
    ours = {run.name for run in runs}
    figures = {
        "leaderboard": leaderboard_figure(per_task, tasks),
        "heatmap": heatmap_figure(per_task, heatmap_models(per_task, tasks)),
    }
    by_name = {res.name: res for res in published}
    for task in tasks:
        preds = {run.name: run.task_preds(task) for run in runs if task in run.tasks}
        preds |= {name: by_name[name].task_preds(task)
                  for name in choose_peers(per_task, task, peers) if name in by_name}
        if TASK_INFO[task].task_type == "regression":
            figures[f"parity_{short_task(task)}"] = parity_figure(task, preds, ours)
        else:
            figures[f"roc_{short_task(task)}"] = roc_figure(task, preds, ours)
    figures["fold_spread"] = fold_spread_figure(
        fold_scores[fold_scores["task"].isin(tasks)], tasks)
    return figures


REPORT_CSS = """
body { font-family: Arial, sans-serif; margin: 2em auto; max-width: 1150px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:nth-child(3), th:nth-child(3) { text-align: left; }
tr.ours { background: #fde2e2; font-weight: bold; }
.figure { margin: 1em 0 2.5em; overflow-x: auto; }
"""


def report_html(table: pd.DataFrame, summary: pd.DataFrame,
                figures: dict[str, go.Figure], benchmarks: Path) -> str:
    """The report page: our runs, the ranked leaderboard and every figure (loading
    plotly.min.js from the same folder)."""
    parts = [f"<h1>Roostformer and Wrenformer on the Matbench leaderboard</h1>"
             f"<p>Generated {datetime.datetime.now():%Y-%m-%d %H:%M} from the "
             f"leaderboard in <code>{html.escape(benchmarks.name)}/</code>. "
             f"{html.escape(TABLE_NOTE)} Lower scaled error is better.</p>",
             "<h2>Our runs</h2>", summary.to_html(index=False, border=0)]
    parts.append("<h2>Leaderboard per task</h2>")
    for task, sub in table.groupby("task", sort=False):
        metric = METRIC_LABELS[sub["metric"].iloc[0]]
        prob = sub["rocauc_prob"].notna().any()
        rows = "".join(
            f"<tr{' class=ours' if r.source == OURS else ''}><td>{r.rank}</td>"
            f"<td>{r.folds}</td><td>{html.escape(r.model)}</td>"
            f"<td>{r.mean:.4g} ± {r.std:.2g}</td><td>{r.scaled_error:.4f}</td>"
            + (f"<td>{_fmt(r.rocauc_prob)}</td>" if prob else "") + "</tr>"
            for r in sub.itertuples())
        parts.append(f"<h3>{task}</h3><table><tr><th>rank</th><th>folds</th>"
                     f"<th>model</th><th>{metric}</th><th>scaled error</th>"
                     + (f"<th>{PROB_LABEL}</th>" if prob else "")
                     + f"</tr>{rows}</table>")
    parts.append("<h2>Figures</h2>")
    for name, fig in figures.items():
        parts.append(f'<div class="figure" id="{name}"><p><a href="{name}.html">'
                     f'{name}.html</a> · <a href="{name}.png">{name}.png</a></p>'
                     f"{fig.to_html(full_html=False, include_plotlyjs=False)}</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            "<title>Matbench comparison</title>"
            f"<script src='{PLOTLY_JS}'></script><style>{REPORT_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def make_plots(
    scores_dir: str | os.PathLike = DEFAULT_SCORES_DIR,
    preds_dir: str | os.PathLike = DEFAULT_PREDS_DIR,
    benchmarks: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    runs: list[str] | None = None,
    peers: list[str] | None = None,
    tasks: list[str] | None = None,
    png: bool = True,
    leaderboard_scores: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build everything into out_dir and return {"table": ranked leaderboard,
    "heatmap": heatmap table, "per_task": scores per model and task, "files": paths
    written}. `tasks` restricts the comparison (default: every task, so that the
    heatmap shows the published entries' other tasks too)."""
    for task in tasks or []:
        check_task(task)
    folder = benchmarks_dir(benchmarks)
    scores_csv = leaderboard_scores_path(folder, leaderboard_scores)
    out_dir = Path(out_dir)
    our_runs = load_runs(scores_dir, preds_dir, runs)
    if tasks:
        for run in our_runs:
            run.preds = run.preds[run.preds["task"].isin(tasks)]
        our_runs = [run for run in our_runs if len(run.preds)]
        if not our_runs:
            raise UserError(f"none of the runs has results for {', '.join(tasks)}")
    shown = our_tasks(our_runs)

    published_scores = leaderboard_fold_scores(folder, tasks or list(ALL_TASKS),
                                               out_dir / CACHE_FILE)
    fold_scores = pd.concat([score_results(our_runs), published_scores],
                            ignore_index=True)
    per_task = task_scores(fold_scores)
    if scores_csv is not None:  # the entries without prediction files, by score
        loaded = set(per_task.loc[per_task["source"] == MATBENCH, "key"])
        per_task = pd.concat([per_task, scores_only_entries(scores_csv, loaded, tasks)],
                             ignore_index=True)
    table = rank_table(per_task, shown)

    published_names = per_task.loc[per_task["source"] == MATBENCH, ["name", "key"]]
    unknown = sorted(set(peers or []) - set(published_names.to_numpy().ravel()))
    if unknown:
        raise UserError(f"unknown --peers {', '.join(unknown)}: choose among "
                        f"{', '.join(sorted(published_names['name'].unique()))}")
    # predictions of the published peers, only for the tasks and entries drawn
    keys = {per_task.loc[(per_task["name"] == name), "key"].iloc[0]
            for task in shown for name in choose_peers(per_task, task, peers)}
    published = load_leaderboard(folder, shown, sorted(keys)) if keys else []
    figures = build_figures(our_runs, published, fold_scores, per_task, shown, peers)

    files = write_figures(figures, out_dir, png=png)
    files.append(write_text(out_dir / "leaderboard.csv",
                            table.to_csv(index=False, float_format="%.6g")))
    files.append(write_text(out_dir / "leaderboard.md", markdown_table(table)))
    files.append(write_text(out_dir / "results.md", results_markdown(table, our_runs)))
    files.append(write_text(out_dir / "index.html", report_html(
        table, run_summary(our_runs), figures, folder)))
    return {"table": table, "heatmap": heatmap_table(
        per_task, heatmap_models(per_task, shown))[0], "per_task": per_task,
        "files": files}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--scores-dir", default=DEFAULT_SCORES_DIR,
                        help="our runs' scores (default: model_scores/)")
    parser.add_argument("--preds-dir", default=DEFAULT_PREDS_DIR,
                        help="our runs' predictions (default: model_preds/)")
    parser.add_argument("--benchmarks-dir", default=None,
                        help="matbench's benchmarks/ folder "
                        f"(default: ${BENCHMARKS_ENV})")
    parser.add_argument("--leaderboard-scores", default=None,
                        help="the whole published leaderboard's scores, a CSV of task, "
                        "algorithm, benchmark_folder, metric, mean, std (default: "
                        f"${LEADERBOARD_SCORES_ENV}, else {LEADERBOARD_SCORES_FILE} "
                        "beside the benchmarks folder); entries without prediction "
                        "files are ranked by these scores")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help="where the report and figures go (default: plots/)")
    parser.add_argument("--runs", nargs="+", metavar="NAME",
                        help="runs to show (default: all in --scores-dir)")
    parser.add_argument("--peers", nargs="+", metavar="NAME",
                        help="published models drawn in the parity and ROC plots "
                        f"(default: the {N_DEFAULT_PEERS} best on each task)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="compare on these tasks only (default: all)")
    parser.add_argument("--no-png", action="store_true", help="HTML figures only")
    parser.add_argument("--readme", action="store_true",
                        help="also write the results table (results.md) into README.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = make_plots(args.scores_dir, args.preds_dir, args.benchmarks_dir,
                         args.out_dir, args.runs, args.peers, args.tasks,
                         png=not args.no_png,
                         leaderboard_scores=args.leaderboard_scores)
        if args.readme:
            update_readme(Path(ROOT) / "README.md",
                          (Path(args.out_dir) / "results.md").read_text())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(terminal_table(out["table"]))
    print(f"\nwrote {len(out['files'])} files; report: "
          f"{Path(args.out_dir) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
