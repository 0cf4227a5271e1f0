"""Plotly figures that place our runs on the Matbench leaderboard, and a writer
that saves figures as interactive HTML and as PNG (kaleido, headless Chromium).

Every figure function takes the tables of mat_bench.leaderboard (fold_scores from
score_results, per_task from task_scores) or per-sample predictions, and returns a
plotly Figure; make_plots.py builds them all. Example:

    from mat_bench.leaderboard import load_runs, score_results, task_scores
    from mat_bench.plotting_functions import heatmap_figure, write_figures
    per_task = task_scores(score_results(load_runs()))
    write_figures({"heatmap": heatmap_figure(per_task)}, "plots")

Scaled error, the common scale of all figures: MAE / MAD of the task's target for
regression, (1 - ROC-AUC) / 0.5 for classification; 0 is perfect, 1 is as good as
predicting the mean (or a coin flip).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sklearn.metrics import r2_score, roc_auc_score, roc_curve

from mat_bench import ALL_TASKS, CLASS_THRESHOLD, N_FOLDS, TASK_INFO
from mat_bench.data import UserError, atomic_path
from mat_bench.leaderboard import OURS, task_metric

# --- defaults, in one place -------------------------------------------------------
OUR_COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#e377c2", "#8c564b", "#bcbd22")
PEER_COLORS = ("#1f77b4", "#2ca02c", "#17becf", "#7f7f7f", "#393b79", "#637939")
PUBLISHED_COLOR = "#9fb4c7"  # bars of published entries in the leaderboard
MAX_POINTS = 4000  # points drawn per model in a parity plot (all of them are scored)
OWN_MEAN = "mean (own tasks)"  # heatmap column: mean over the tasks a model has
COMMON_MEAN = "mean (common tasks)"  # heatmap column: tasks every shown model has
PLOTLY_JS = "plotly.min.js"  # written once beside the HTML files, which load it
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium, used by kaleido if present
FONT = dict(family="Arial, sans-serif", size=13)
SCALED_ERROR_TITLE = "scaled error (MAE/MAD or (1-ROC-AUC)/0.5)"
METRIC_LABELS = {"mae": "MAE", "rocauc": "ROC-AUC"}


def short_task(task: str) -> str:
    """matbench_expt_gap -> expt_gap."""
    return task.removeprefix("matbench_")


def target_unit(task: str) -> str:
    """' (unit)' of a task's target from matbench's metadata, '' if unitless."""
    from matbench.metadata import mbv01_metadata

    unit = mbv01_metadata[task].get("unit")
    return f" ({unit})" if unit and unit != "unitless" else ""


def _color_map(names: list[str], ours: set[str]) -> dict[str, str]:
    """A fixed color per model: warm colors for ours, cool ones for peers."""
    ours_list = [n for n in names if n in ours]
    peers = [n for n in names if n not in ours]
    colors = {n: OUR_COLORS[i % len(OUR_COLORS)] for i, n in enumerate(ours_list)}
    colors |= {n: PEER_COLORS[i % len(PEER_COLORS)] for i, n in enumerate(peers)}
    return colors


def _label(name: str, ours: set[str]) -> str:
    """Axis label of a model: ours in bold."""
    return f"<b>{name}</b>" if name in ours else name


def _our_names(per_task: pd.DataFrame) -> set[str]:
    return set(per_task.loc[per_task["source"] == OURS, "name"])


def _fold_note(n_folds: int) -> str:
    return "" if n_folds >= N_FOLDS else f" ({n_folds}/{N_FOLDS} folds)"


# --- leaderboard ------------------------------------------------------------------
def leaderboard_figure(per_task: pd.DataFrame, tasks: list[str] | None = None
                       ) -> go.Figure:
    """One bar chart per task of every model's scaled error, best on top, our runs
    in color (partial runs note their fold count), the rest in grey-blue."""
    tasks = tasks or [t for t in ALL_TASKS if t in set(per_task["task"])]
    ours = _our_names(per_task)
    counts = [int((per_task["task"] == t).sum()) for t in tasks]
    heights = [max(n, 2) * 22 + 60 for n in counts]
    fig = make_subplots(rows=len(tasks), cols=1, row_heights=heights,
                        vertical_spacing=min(0.3 / len(tasks), 0.12) if tasks else 0,
                        subplot_titles=[
                            f"{short_task(t)}: {METRIC_LABELS[task_metric(t)]}"
                            for t in tasks])
    colors = _color_map(sorted(ours), ours)
    for row, task in enumerate(tasks, start=1):
        sub = per_task[per_task["task"] == task].sort_values("scaled_error",
                                                             ascending=False)
        metric = task_metric(task)
        text = [f"#{len(sub) - i}  {getattr(r, metric):.4g}{_fold_note(r.n_folds)}"
                for i, r in enumerate(sub.itertuples())]
        fig.add_trace(go.Bar(
            x=sub["scaled_error"], y=[_label(n, ours) for n in sub["name"]],
            orientation="h", text=text, textposition="outside", cliponaxis=False,
            marker_color=[colors.get(n, PUBLISHED_COLOR) for n in sub["name"]],
            showlegend=False,
            hovertemplate="%{y}<br>scaled error %{x:.4f}<br>%{text}<extra></extra>",
        ), row=row, col=1)
        fig.update_xaxes(range=[0, max(1.0, sub["scaled_error"].max()) * 1.35],
                         row=row, col=1)
    fig.update_xaxes(title_text=SCALED_ERROR_TITLE, row=len(tasks), col=1)
    fig.update_layout(
        title="Matbench leaderboard: scaled error per task (lower is better; "
              "label: rank and MAE or ROC-AUC)",
        height=sum(heights) + 150, width=1000, font=FONT, template="plotly_white",
        margin=dict(l=260, r=40, t=90, b=60))
    return fig


# --- heatmap ----------------------------------------------------------------------
def heatmap_table(per_task: pd.DataFrame, names: list[str] | None = None
                  ) -> tuple[pd.DataFrame, list[str]]:
    """Models x tasks of scaled error with OWN_MEAN (mean over the tasks a model
    has) and COMMON_MEAN (over the tasks every shown model has), sorted best
    first by COMMON_MEAN, or by OWN_MEAN where no task is common; ties by
    OWN_MEAN, then name. Returns the table and the common tasks."""
    sub = per_task if names is None else per_task[per_task["name"].isin(names)]
    table = sub.pivot(index="name", columns="task", values="scaled_error")
    table = table[[t for t in ALL_TASKS if t in table.columns]]
    common = [t for t in table.columns if table[t].notna().all()]
    table[OWN_MEAN] = table[list(table.columns)].mean(axis=1)
    table[COMMON_MEAN] = table[common].mean(axis=1) if common else np.nan
    table = table.rename_axis(index=None, columns=None)
    table = table.assign(_name=table.index).sort_values(
        [COMMON_MEAN, OWN_MEAN, "_name"], na_position="last").drop(columns="_name")
    return table, common


def heatmap_figure(per_task: pd.DataFrame, names: list[str] | None = None
                   ) -> go.Figure:
    """Heatmap of models (rows, best on top) x tasks of the scaled error, with the
    mean over each model's own tasks and over the tasks all shown models have.
    Cells of partial runs (fewer than 5 folds) are marked with *."""
    table, common = heatmap_table(per_task, names)
    ours = _our_names(per_task)
    tasks = [c for c in table.columns if c not in (OWN_MEAN, COMMON_MEAN)]
    folds = per_task.set_index(["name", "task"])["n_folds"]
    text = []
    for name, row in table.iterrows():
        cells = []
        for col, val in row.items():
            partial = col in tasks and not math.isnan(val) and \
                folds[(name, col)] < N_FOLDS
            mark = "*" if partial else ""
            cells.append("" if math.isnan(val) else f"{val:.3f}{mark}")
        text.append(cells)
    common_label = (f"mean over {len(common)} common<br>task(s): "
                    f"{', '.join(short_task(t) for t in common)}" if common
                    else "no task common<br>to all models")
    x_labels = [short_task(t) for t in tasks] + ["mean over<br>own tasks",
                                                  common_label]
    fig = go.Figure(go.Heatmap(
        z=table.to_numpy(dtype=float), x=x_labels,
        y=[_label(n, ours) for n in table.index], text=text,
        texttemplate="%{text}", textfont=dict(size=12), colorscale="RdYlGn_r",
        zmin=0, zmax=1,
        colorbar=dict(title="scaled<br>error"), xgap=2, ygap=2,
        hovertemplate="%{y}<br>%{x}<br>scaled error %{z:.4f}<extra></extra>"))
    fig.add_vline(x=len(tasks) - 0.5, line_width=3, line_color="black")
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="top", tickangle=-45 if len(x_labels) > 6 else 0)
    fig.update_layout(
        title=dict(text="Scaled error of each model on each task",
                   subtitle_text="best first by the mean over the tasks all have; "
                   "* partial run (fewer than 5 folds); blank: no result"),
        height=max(350, 34 * len(table) + 260),
        width=max(750, 95 * len(x_labels) + 330), font=FONT,
        template="plotly_white", margin=dict(l=300, r=40, t=190, b=30))
    return fig


# --- parity and ROC ---------------------------------------------------------------
def _subsample(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most n rows, the same ones on every call."""
    return frame if len(frame) <= n else frame.sample(n, random_state=0)


def parity_figure(task: str, preds: dict[str, pd.DataFrame], ours: set[str],
                  max_points: int = MAX_POINTS) -> go.Figure:
    """Predicted vs. true target of one regression task for each model (our runs
    and peers), with MAE and R^2 over all their test predictions in the legend."""
    target_name, _, _ = TASK_INFO[task]
    colors = _color_map(list(preds), ours)
    fig = go.Figure()
    lo, hi = np.inf, -np.inf
    # peers first so that our points are drawn on top; ours first in the legend
    for name, frame in sorted(preds.items(), key=lambda item: item[0] in ours):
        y_true = frame["target"].to_numpy(float)
        y_pred = frame["prediction"].to_numpy(float)
        mae = float(np.mean(np.abs(y_pred - y_true)))
        r2 = float(r2_score(y_true, y_pred))
        n_folds = frame["fold"].nunique()
        shown = _subsample(frame, max_points)
        lo = min(lo, y_true.min(), y_pred.min())
        hi = max(hi, y_true.max(), y_pred.max())
        fig.add_trace(go.Scattergl(
            x=shown["target"], y=shown["prediction"], mode="markers",
            name=f"{name}: MAE {mae:.4g}, R² {r2:.3f}{_fold_note(n_folds)}",
            legendrank=1 if name in ours else 2,
            marker=dict(color=colors[name], size=5 if name in ours else 4,
                        opacity=0.7 if name in ours else 0.45),
            text=shown["mbid"],
            hovertemplate="%{text}<br>true %{x:.4g}<br>pred %{y:.4g}"))
    pad = 0.03 * (hi - lo) if hi > lo else 1.0
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad],
                             mode="lines", line=dict(color="black", dash="dash"),
                             name="y = x", hoverinfo="skip", legendrank=3))
    n_max = max((len(f) for f in preds.values()), default=0)
    note = f" (at most {max_points} points drawn per model)" \
        if n_max > max_points else ""
    unit = target_unit(task)
    fig.update_layout(
        title=f"{short_task(task)}: predicted vs. true {target_name}{note}",
        xaxis_title=f"true {target_name}{unit}",
        yaxis_title=f"predicted {target_name}{unit}",
        width=850, height=780, font=FONT, template="plotly_white",
        legend=dict(yanchor="top", y=-0.12, xanchor="left", x=0))
    fig.update_xaxes(range=[lo - pad, hi + pad], constrain="domain")
    fig.update_yaxes(range=[lo - pad, hi + pad], scaleanchor="x", scaleratio=1,
                     constrain="domain")
    return fig


def roc_figure(task: str, preds: dict[str, pd.DataFrame], ours: set[str]
               ) -> go.Figure:
    """ROC curves of one classification task (all test folds pooled) from each
    model's class-1 probabilities, with their ROC-AUC and, marked by a dot, the
    operating point of the recorded labels (probability above 0.5, or our run's
    threshold chosen on validation), whose ROC-AUC is the one matbench scores.
    Published entries that recorded labels only have that point alone."""
    colors = _color_map(list(preds), ours)
    fig = go.Figure()
    for name, frame in preds.items():
        truth = frame["target"].to_numpy().astype(bool)
        prob = frame["probability"].to_numpy(float)
        has_prob = not np.isnan(prob).any()
        labels = frame["prediction"].to_numpy(float) > CLASS_THRESHOLD  # recorded
        label_auc = roc_auc_score(truth, labels)
        fold_note = _fold_note(frame["fold"].nunique())
        if has_prob:
            fpr, tpr, _ = roc_curve(truth, prob)
            legend = (f"{name}: ROC-AUC {roc_auc_score(truth, prob):.4f} "
                      f"(labels: {label_auc:.4f}){fold_note}")
        else:
            fpr, tpr, _ = roc_curve(truth, labels)
            legend = f"{name}: ROC-AUC {label_auc:.4f} (labels only){fold_note}"
        fig.add_trace(go.Scatter(
            x=fpr, y=tpr, mode="lines", name=legend, legendgroup=name,
            line=dict(color=colors[name], width=3 if name in ours else 2,
                      dash="solid" if name in ours else "dot")))
        point_fpr = float(np.mean(labels[~truth])) if (~truth).any() else 0.0
        point_tpr = float(np.mean(labels[truth])) if truth.any() else 0.0
        fig.add_trace(go.Scatter(
            x=[point_fpr], y=[point_tpr], mode="markers", legendgroup=name,
            showlegend=False, marker=dict(color=colors[name], size=10,
                                          line=dict(color="black", width=1)),
            hovertemplate=f"{name}<br>recorded labels<br>FPR %{{x:.3f}}, "
                          "TPR %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line=dict(color="grey", dash="dash")))
    fig.update_layout(
        title=dict(text=f"{short_task(task)}: ROC curve (test folds pooled)",
                   subtitle_text="dot: the recorded labels, which matbench scores"),
        xaxis_title="false positive rate", yaxis_title="true positive rate",
        width=850, height=780, font=FONT, template="plotly_white",
        legend=dict(yanchor="top", y=-0.12, xanchor="left", x=0))
    fig.update_xaxes(range=[0, 1], constrain="domain")
    fig.update_yaxes(range=[0, 1.01], scaleanchor="x", scaleratio=1,
                     constrain="domain")
    return fig


# --- per-fold spread --------------------------------------------------------------
def fold_spread_figure(fold_scores: pd.DataFrame, tasks: list[str] | None = None
                       ) -> go.Figure:
    """Scaled error of every fold of every model, one panel per task: a box per
    model (sorted by its mean, best on top) with each fold as a point."""
    tasks = tasks or [t for t in ALL_TASKS if t in set(fold_scores["task"])]
    ours = set(fold_scores.loc[fold_scores["source"] == OURS, "name"])
    colors = _color_map(sorted(ours), ours)
    counts = [fold_scores.loc[fold_scores["task"] == t, "name"].nunique()
              for t in tasks]
    heights = [max(n, 2) * 26 + 60 for n in counts]
    fig = make_subplots(rows=len(tasks), cols=1, row_heights=heights,
                        vertical_spacing=min(0.3 / len(tasks), 0.12) if tasks else 0,
                        subplot_titles=[short_task(t) for t in tasks])
    for row, task in enumerate(tasks, start=1):
        sub = fold_scores[fold_scores["task"] == task]
        order = sub.groupby("name")["scaled_error"].mean().sort_values(
            ascending=False).index
        for name in order:
            folds = sub[sub["name"] == name]
            label = _label(name, ours) + _fold_note(len(folds))
            fig.add_trace(go.Box(
                x=folds["scaled_error"], y=[label] * len(folds),
                orientation="h", boxpoints="all", jitter=0.3, pointpos=0,
                marker=dict(color=colors.get(name, "#4c6a8a"), size=6),
                line=dict(width=1.5), fillcolor="rgba(0,0,0,0)",
                name=name, showlegend=False,
                text=[f"fold {f}" for f in folds["fold"]],
                hovertemplate="%{y}<br>%{text}: %{x:.4f}<extra></extra>"),
                row=row, col=1)
        fig.update_xaxes(range=[0, max(1.0, sub["scaled_error"].max()) * 1.05],
                         row=row, col=1)
    fig.update_xaxes(title_text=SCALED_ERROR_TITLE, row=len(tasks), col=1)
    fig.update_layout(
        title="Spread over the test folds (one point per fold; lower is better)",
        height=sum(heights) + 150, width=1000, font=FONT, template="plotly_white",
        margin=dict(l=260, r=40, t=90, b=60))
    return fig


# --- writing ----------------------------------------------------------------------
def ensure_browser() -> None:
    """Point kaleido at Debian's chromium when BROWSER_PATH is unset."""
    if not os.environ.get("BROWSER_PATH") and os.path.exists(CHROMIUM):
        os.environ["BROWSER_PATH"] = CHROMIUM


def write_plotly_js(out_dir: str | os.PathLike) -> Path:
    """plotly.js beside the HTML files (written once; they all load it)."""
    from plotly.offline import get_plotlyjs

    path = Path(out_dir) / PLOTLY_JS
    if not path.is_file():
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
            file.write(get_plotlyjs())
    return path


def write_figures(figures: dict[str, go.Figure], out_dir: str | os.PathLike,
                  png: bool = True) -> list[Path]:
    """Write each figure as <out_dir>/<name>.html (loading plotly.min.js from its
    folder) and, with png, <name>.png, all PNGs in one Chromium session. Files
    appear whole or not at all. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plotly_js(out_dir)
    written = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.html"
        with atomic_path(path) as tmp:
            fig.write_html(tmp, include_plotlyjs=PLOTLY_JS, full_html=True)
        written.append(path)
    if png and figures:
        written += write_pngs(figures, out_dir)
    return written


def write_pngs(figures: dict[str, go.Figure], out_dir: Path) -> list[Path]:
    """<out_dir>/<name>.png of each figure through kaleido, in one batch."""
    import plotly.io as pio

    ensure_browser()
    paths = [out_dir / f"{name}.png" for name in figures]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        try:
            pio.write_images(
                list(figures.values()), tmps, format="png",
                width=[fig.layout.width or 1000 for fig in figures.values()],
                height=[fig.layout.height or 700 for fig in figures.values()])
        except Exception as exc:  # kaleido could not find or start Chrome
            if "chrome" not in str(exc).lower() and "browser" not in str(exc).lower():
                raise
            raise UserError(
                f"PNG export failed ({type(exc).__name__}: {str(exc)[:160]}): "
                "install Chromium (`apt-get install chromium`) and set BROWSER_PATH "
                "to it, or pass --no-png"
            ) from exc
    return paths
