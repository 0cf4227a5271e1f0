r"""Compare the Aflow-style Wyckoff labels (Wrenformer's input) that different symmetry
tools assign to the structures of one Matbench task.

Labels come from spglib and moyopy (through pymatgen.analysis.prototypes) and from
AFLOW when its `aflow` binary is on PATH (it is not pip-installable; without it the
script says so and compares the others). For every pair of tools it reports the
percentage of structures with identical labels, the same space group and the same
crystal system, and each tool's time per structure. It writes:

- `<task>_symprec<X>_disagreements.csv`: the structures where any two labels differ
- `<task>_symprec<X>_sankey_spg_<a>_vs_<b>.{html,png}`: space groups, tool a -> tool b
- `<task>_symprec<X>_sankey_crys_sys_<a>_vs_<b>.{html,png}`: crystal systems likewise
- `<task>_symprec<X>_sunburst_spg_<a>.{html,png}`: crystal system -> space group
- `cache/labels_<task>_<tool>_symprec<X>.csv`: the labels, so that a rerun is instant

Examples:
    python compare_spglib_vs_aflow_wyckoff_labels.py
    python compare_spglib_vs_aflow_wyckoff_labels.py --task matbench_phonons \
        --symprec 1e-3
    python compare_spglib_vs_aflow_wyckoff_labels.py --symprec 0.01 \
        --out-dir results/wyckoff_loose

Structures come from `load_raw_task` (set MATBENCH_RAW_DIR to the folder holding the
task's `<task>.json.gz`). PNG export needs kaleido and Chrome/Chromium: set
BROWSER_PATH to its binary if `chromium` is not on PATH; without a browser, only the
HTML figures are written.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from pathlib import Path

import pandas as pd

from mat_bench import ROOT, STRUCTURE_TASKS, TASK_INFO
from mat_bench.data import (
    ArgumentParser,
    UserError,
    atomic_path,
    check_task,
    load_raw_task,
)
from mat_bench.plotting_functions import write_figures
from mat_bench.wyckoff import TOOLS, protostructure_label

DEFAULT_OUT_DIR = os.path.join(ROOT, "results", "compare_wyckoff")
# a valid label: <formula>_<pearson>_<spg>_<wyckoffs...>:<chemsys>, no whitespace
LABEL_RE = re.compile(
    r"^[A-Za-z0-9]+_[a-zA-Z]{2}\d+_(\d{1,3})(_[A-Za-z0-9]+)+:[A-Za-z-]+$"
)
CRYSTAL_SYSTEMS = (  # (last space group number, name)
    (2, "triclinic"),
    (15, "monoclinic"),
    (74, "orthorhombic"),
    (142, "tetragonal"),
    (167, "trigonal"),
    (194, "hexagonal"),
    (230, "cubic"),
)


# --- checks -------------------------------------------------------------------------
def check_symprec(symprec: float) -> None:
    """Raise UserError unless symprec is a sensible symmetry tolerance (Å)."""
    if not math.isfinite(symprec) or not 0 < symprec <= 1:
        raise UserError(
            f"--symprec {symprec} is not a valid tolerance: pass a distance in Å "
            "between 0 (excluded) and 1, e.g. 0.1 (loose) or 1e-5 (strict)"
        )


def check_structure_task(task: str) -> None:
    """Raise UserError for an unknown task or one whose inputs are compositions."""
    check_task(task)
    if TASK_INFO[task].input_type != "structure":
        raise UserError(
            f"{task} has compositions only, no structures to label: choose a "
            f"structure task ({', '.join(STRUCTURE_TASKS)})"
        )


def available_tools() -> tuple[list[str], list[str]]:
    """The tools usable here and a note for each one that is not."""
    tools, notes = ["spglib", "moyopy"], []
    if shutil.which("aflow"):
        tools.append("aflow")
    else:
        notes.append(
            "AFLOW: no `aflow` binary on PATH (it cannot be pip-installed; see "
            "https://aflow.org/install-aflow/), so AFLOW labels are skipped and only "
            "spglib and moyopy are compared"
        )
    return tools, notes


# --- labels -------------------------------------------------------------------------
def spg_num_from_label(label: str) -> int | None:
    """Space group number of a label (3rd `_` field before `:`), None for a failure."""
    match = LABEL_RE.match(label) if isinstance(label, str) else None
    if match is None or not 1 <= int(match.group(1)) <= 230:
        return None
    return int(match.group(1))


def oc_pearson(label: str) -> str:
    """The label with moyopy's Pearson symbol oS (base-centred orthorhombic, newer
    notation) written as oC, as spglib and AFLOW do."""
    return re.sub(r"^([^_]+)_oS", r"\1_oC", label) if isinstance(label, str) else label


def crystal_system(spg_num: int | None) -> str | None:
    """Crystal system of an international space group number (None for None)."""
    if spg_num is None:
        return None
    return next(name for last, name in CRYSTAL_SYSTEMS if spg_num <= last)


def label_structure(tool: str, struct, symprec: float) -> str:
    """One structure's label from one tool; the reason (never an exception) when
    the tool fails."""
    label, error = protostructure_label(struct, tool, symprec)
    return label or str(error)


_WARM_TOOLS: set[str] = set()  # tools whose imports this process has done


def _label_chunk(args: tuple[str, float, list]) -> list[tuple[str, float]]:
    """Worker: (label, seconds) for each structure of a chunk. A first untimed call
    per process keeps import time out of the timings."""
    tool, symprec, structs = args
    if tool not in _WARM_TOOLS and structs:
        label_structure(tool, structs[0], symprec)
        _WARM_TOOLS.add(tool)
    out = []
    for struct in structs:
        start = time.perf_counter()
        label = label_structure(tool, struct, symprec)
        out.append((label, time.perf_counter() - start))
    return out


def compute_labels(
    tool: str, structures: pd.Series, symprec: float, workers: int = 2
) -> pd.DataFrame:
    """Label `structures` (indexed by mbid) with one tool in `workers` processes;
    returns columns label and seconds (time spent labelling each structure)."""
    structs = list(structures)
    chunk = max(1, min(50, math.ceil(len(structs) / (4 * max(workers, 1)))))
    jobs = [
        (tool, symprec, structs[i : i + chunk])
        for i in range(0, len(structs), chunk)
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [row for part in pool.map(_label_chunk, jobs) for row in part]
    else:
        results = [row for job in jobs for row in _label_chunk(job)]
    return pd.DataFrame(results, index=structures.index, columns=["label", "seconds"])


def cache_path(
    out_dir: str | os.PathLike, task: str, tool: str, symprec: float
) -> Path:
    """Where the labels of one task, tool and symprec are cached."""
    return Path(out_dir) / "cache" / f"labels_{task}_{tool}_symprec{symprec:g}.csv"


def read_cache(path: Path) -> pd.DataFrame:
    """Cached labels (index mbid; columns label, seconds); empty if absent or bad."""
    empty = pd.DataFrame(columns=["label", "seconds"], index=pd.Index([], name="mbid"))
    if not path.is_file():
        return empty
    try:
        df = pd.read_csv(path, index_col="mbid", keep_default_na=False)
        df["seconds"] = df["seconds"].astype(float)
        return df[["label", "seconds"]]
    except Exception as exc:
        print(f"warning: ignoring unreadable cache {path} ({exc})", file=sys.stderr)
        return empty


def get_labels(
    df: pd.DataFrame,
    tool: str,
    symprec: float,
    out_dir: str | os.PathLike,
    task: str,
    workers: int = 2,
    force: bool = False,
) -> tuple[pd.DataFrame, int]:
    """Labels of every structure in `df` from the cache, computing (and caching)
    only the missing ones. Returns (labels indexed like df, number computed now)."""
    path = cache_path(out_dir, task, tool, symprec)
    cached = pd.DataFrame() if force else read_cache(path)
    missing = df.index.difference(cached.index) if len(cached) else df.index
    if len(missing):
        print(f"labelling {len(missing)} structures with {tool}...", file=sys.stderr)
        new = compute_labels(tool, df.loc[missing, "structure"], symprec, workers)
        cached = pd.concat([cached, new]) if len(cached) else new
        cached.index.name = "mbid"
        with atomic_path(path) as tmp:
            cached.to_csv(tmp)
    return cached.loc[df.index], len(missing)


# --- comparison ---------------------------------------------------------------------
def label_table(labels: dict[str, pd.Series]) -> pd.DataFrame:
    """One row per structure: each tool's label, space group and crystal system."""
    table = pd.DataFrame(labels)
    for tool in labels:
        table[f"{tool}_spg"] = table[tool].map(spg_num_from_label).astype("Int64")
        table[f"{tool}_crys_sys"] = table[f"{tool}_spg"].map(
            lambda n: crystal_system(None if pd.isna(n) else int(n))
        )
    return table


def agreement(table: pd.DataFrame, tools: Sequence[str]) -> pd.DataFrame:
    """For each pair of tools: structures both labelled, and the % of those with
    identical labels, the same space group and the same crystal system."""
    rows = []
    for tool_a, tool_b in combinations(tools, 2):
        both = table[table[f"{tool_a}_spg"].notna() & table[f"{tool_b}_spg"].notna()]
        n_both = len(both)

        def pct(
            col: str = "", fix=lambda label: label, both=both, tool_a=tool_a,
            tool_b=tool_b, n_both=n_both,
        ) -> float:
            same = both[f"{tool_a}{col}"].map(fix) == both[f"{tool_b}{col}"].map(fix)
            return round(100 * same.sum() / n_both, 2) if n_both else float("nan")

        rows.append({
            "tools": f"{tool_a} vs {tool_b}",
            "n_both_labelled": n_both,
            "% identical label": pct(),
            "% identical (oS = oC)": pct(fix=oc_pearson),
            "% same spg": pct("_spg"),
            "% same crystal system": pct("_crys_sys"),
        })
    return pd.DataFrame(rows).set_index("tools")


def disagreements(table: pd.DataFrame, tools: Sequence[str]) -> pd.DataFrame:
    """Rows where any two tools' labels differ (a failure differs from any label),
    with the list of disagreeing pairs."""
    pairs = pd.Series([[] for _ in range(len(table))], index=table.index)
    for tool_a, tool_b in combinations(tools, 2):
        differ = table[tool_a] != table[tool_b]
        for mbid in table.index[differ]:
            pairs[mbid].append(f"{tool_a}/{tool_b}")
    out = table[pairs.map(len) > 0].copy()
    out.insert(0, "disagreeing_pairs", pairs[out.index].map(" ".join))
    return out


# --- figures ------------------------------------------------------------------------
@functools.cache
def spg_symbol(spg_num: int) -> str:
    """Short Hermann-Mauguin symbol of a space group number, e.g. 14 -> P2_1/c."""
    import moyopy

    return moyopy.SpaceGroupType(spg_num).hm_short.replace(" ", "")


def _node_names(
    series: pd.Series, col: str, keep: set[int] | None = None
) -> tuple[pd.Series, list[str]]:
    """Display name of each structure's space group / crystal system ('failed' for a
    failed label; space groups not in `keep` lumped as 'other') and the node order:
    by space group number or crystal system."""
    if col == "spg":
        def key(num: float) -> int:
            if pd.isna(num):
                return 999
            return int(num) if keep is None or int(num) in keep else 500

        keys = series.map(key)
        names = series.map(
            lambda num: "failed" if pd.isna(num)
            else f"{spg_symbol(int(num))} ({int(num)})"
        )
        names[keys == 500] = "other space groups"
    else:
        rank = [name for _, name in CRYSTAL_SYSTEMS]
        keys = series.map(lambda name: 99 if pd.isna(name) else rank.index(name))
        names = series.fillna("failed")
    return names, names.groupby(keys).first().tolist()


def sankey_figure(
    table: pd.DataFrame, tool_a: str, tool_b: str, col: str, title: str,
    n_top: int = 25,
):
    """Plotly sankey of the `col` (spg or crys_sys) assignments, tool_a -> tool_b:
    grey links keep the assignment, red links change it. For readability, space
    groups outside tool_a's `n_top` commonest that no structure changes to or
    from are lumped as 'other space groups'."""
    import plotly.graph_objects as go

    src, dst = table[f"{tool_a}_{col}"], table[f"{tool_b}_{col}"]
    keep = None
    if col == "spg":
        changed = src.ne(dst) & src.notna() & dst.notna()
        keep = (set(src.value_counts().index[:n_top]) | set(src[changed])
                | set(dst[changed]))
        keep = {int(num) for num in keep}
    names_a, order_a = _node_names(src, col, keep)
    names_b, order_b = _node_names(dst, col, keep)
    nodes = [f"{tool_a}: {name}" for name in order_a] + [
        f"{tool_b}: {name}" for name in order_b
    ]
    index = {name: idx for idx, name in enumerate(nodes)}
    flows = (pd.DataFrame({"a": names_a, "b": names_b}).value_counts()
             .reset_index(name="n"))
    differ = flows.a != flows.b  # changed space groups are never lumped

    def node_y(names: pd.Series, order: list[str]) -> list[float]:
        """Vertical node centres in `order`, with gaps, so that plotly keeps it."""
        sizes = names.value_counts()[order].to_numpy() / len(names)
        gap = 0.3 / max(len(order) - 1, 1)
        tops = [sum(sizes[:idx]) * 0.7 + idx * gap for idx in range(len(order))]
        return [min(max(top + 0.35 * size, 0.001), 0.999)
                for top, size in zip(tops, sizes, strict=True)]

    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node=dict(
            label=nodes, pad=8, thickness=14, line=dict(width=0),
            x=[0.001] * len(order_a) + [0.999] * len(order_b),
            y=node_y(names_a, order_a) + node_y(names_b, order_b),
        ),
        link=dict(
            source=[index[f"{tool_a}: {name}"] for name in flows.a],
            target=[index[f"{tool_b}: {name}"] for name in flows.b],
            value=flows.n.tolist(),
            color=["rgba(214,39,40,0.7)" if d else "rgba(140,140,140,0.3)"
                   for d in differ],
        ),
    ))
    n_diff = int((names_a != names_b).sum())
    fig.update_layout(
        title=f"{title}<br><sup>{n_diff} of {len(table)} structures change "
        "(red links); grey links keep their assignment</sup>",
        font_size=11, width=1000,
        height=max(600, 22 * max(len(order_a), len(order_b)) + 200),
    )
    return fig


def sunburst_figure(table: pd.DataFrame, tool: str, title: str):
    """Plotly sunburst of one tool's assignments: crystal system -> space group."""
    import plotly.express as px

    counts = table[f"{tool}_spg"].dropna().astype(int).value_counts().reset_index()
    counts.columns = ["spg_num", "count"]
    counts["crystal system"] = counts.spg_num.map(crystal_system)
    counts["space group"] = [f"{spg_symbol(n)} ({n})" for n in counts.spg_num]
    fig = px.sunburst(counts, path=["crystal system", "space group"], values="count")
    fig.update_traces(textinfo="label+percent root")
    n_failed = int(table[f"{tool}_spg"].isna().sum())
    fig.update_layout(
        title=f"{title}<br><sup>{len(table) - n_failed} structures "
        f"({n_failed} failed labels not shown)</sup>",
        width=800, height=800,
    )
    return fig


def make_figures(
    table: pd.DataFrame, pair: Sequence[str], prefix: str, png: bool = True
) -> list[str]:
    """Sankeys (space group, crystal system) from pair[0] to pair[1] and a
    space-group sunburst of pair[0]; returns the written paths."""
    tool_a, tool_b = pair
    figs = {}
    for col, what in (("spg", "space group"), ("crys_sys", "crystal system")):
        figs[f"{prefix}_sankey_{col}_{tool_a}_vs_{tool_b}"] = sankey_figure(
            table, tool_a, tool_b, col, f"{what} assignments: {tool_a} -> {tool_b}"
        )
    figs[f"{prefix}_sunburst_spg_{tool_a}"] = sunburst_figure(
        table, tool_a, f"space groups from {tool_a}"
    )
    folder = os.path.dirname(prefix) or "."
    named = {os.path.basename(stem): fig for stem, fig in figs.items()}
    return [str(path) for path in write_figures(named, folder, png=png)]


# --- driver -------------------------------------------------------------------------
def compare_labels(
    task: str = "matbench_phonons",
    symprec: float = 0.1,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    tools: Sequence[str] | None = None,
    pair: Sequence[str] | None = None,
    workers: int = 2,
    limit: int | None = None,
    force: bool = False,
    png: bool = True,
) -> dict:
    """Label the task's structures with each tool (default: all available) and
    compare them; the figures show `pair` (default: spglib and AFLOW if available,
    else spglib and moyopy). Returns a dict
    with `table` (labels), `agreement`, `timing`, `disagreements` (DataFrames),
    `notes` and `files` (paths written)."""
    check_structure_task(task)
    check_symprec(symprec)
    notes: list[str] = []
    if tools is None:
        tools, notes = available_tools()
    if len(tools) < 2 or set(tools) - set(TOOLS):
        raise UserError(f"tools {list(tools)}: pass two or more of {', '.join(TOOLS)}")
    if "aflow" in tools and not shutil.which("aflow"):
        raise UserError("no `aflow` binary on PATH: install AFLOW or leave it out")
    if pair is None:
        pair = ("spglib", "aflow") if "aflow" in tools else tuple(tools[:2])
    if len(pair) != 2 or pair[0] == pair[1] or set(pair) - set(tools):
        why = (" (no `aflow` binary on PATH)" if "aflow" in set(pair) - set(tools)
               else "")
        raise UserError(
            f"cannot draw {' vs '.join(pair)}{why}: pick two different tools among "
            f"{', '.join(tools)}"
        )
    df = load_raw_task(task)
    if "structure" not in df:
        raise UserError(
            f"no structures for {task}: only a composition table was found; put "
            f"matminer's {task}.json.gz in a folder listed in MATBENCH_RAW_DIR"
        )
    if limit is not None:
        df = df.iloc[:limit]
    labels, timing = {}, []
    for tool in tools:
        tool_labels, n_new = get_labels(
            df, tool, symprec, out_dir, task, workers, force
        )
        labels[tool] = tool_labels.label
        spg = tool_labels.label.map(spg_num_from_label)
        timing.append({
            "tool": tool,
            "n_structures": len(tool_labels),
            "n_failed": int(spg.isna().sum()),
            "ms per structure": round(1000 * tool_labels.seconds.mean(), 2),
            "source": "computed now" if n_new == len(df) else
            "cache" if n_new == 0 else f"cache + {n_new} computed",
        })
    table = label_table(labels)
    table.insert(0, "composition", df.composition)
    prefix = str(Path(out_dir) / f"{task}_symprec{symprec:g}")
    diff = disagreements(table, tools)
    diff_path = f"{prefix}_disagreements.csv"
    with atomic_path(diff_path) as tmp:
        diff.to_csv(tmp)
    files = [diff_path] + make_figures(table, pair, prefix, png)
    return {
        "table": table,
        "agreement": agreement(table, tools),
        "timing": pd.DataFrame(timing).set_index("tool"),
        "disagreements": diff,
        "notes": notes,
        "files": files,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--task", default="matbench_phonons",
                        help="a Matbench structure task (default: matbench_phonons)")
    parser.add_argument("--symprec", type=float, default=0.1,
                        help="symmetry tolerance in Å for every tool (default: 0.1)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help="where tables, figures and the label cache go "
                        "(default: results/compare_wyckoff/)")
    parser.add_argument("--pair", nargs=2, choices=TOOLS, metavar=("A", "B"),
                        help="the two tools whose sankeys are drawn (default: spglib "
                        "aflow if AFLOW is available, else spglib moyopy)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes per tool (default: 2)")
    parser.add_argument("--force", action="store_true",
                        help="ignore the label cache and recompute")
    parser.add_argument("--no-png", action="store_true", help="write HTML figures only")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: pass 1 or more")
        if args.limit is not None and args.limit < 1:
            raise UserError("--limit must be at least 1")
        result = compare_labels(
            args.task, args.symprec, args.out_dir, pair=args.pair, workers=args.workers,
            limit=args.limit, force=args.force, png=not args.no_png,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}")
    n_diff = len(result["disagreements"])
    print("\nwritten:\n  " + "\n  ".join(result["files"]))
    print(f"\n{n_diff} structures where labels differ (see the disagreements CSV)")
    with pd.option_context("display.width", 200, "display.max_columns", 10):
        print(f"\ntime per structure ({args.task}, symprec={args.symprec:g}):")
        print(result["timing"].reset_index().to_string(index=False))
        print(f"\nagreement between tools ({args.task}, symprec={args.symprec:g}):")
        print(result["agreement"].reset_index().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
