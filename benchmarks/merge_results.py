"""Merge runs recorded elsewhere (a lent GPU machine's OUT folder, another clone)
into this repository's model_scores/ and model_preds/, fold by fold; folds already
recorded here are kept. Examples:

    python benchmarks/merge_results.py /path/to/OUT
    python benchmarks/merge_results.py /path/to/OUT --into /path/to/clone
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mat_bench import ROOT
from mat_bench.data import ArgumentParser, UserError
from mat_bench.runs import merge_run_results


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("src", help="folder holding model_scores/ and model_preds/")
    parser.add_argument("--into", default=ROOT, help="folder to merge into")
    args = parser.parse_args(argv)
    try:
        merged = merge_run_results(args.src, args.into)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run, task, fold, status in merged:
        print(f"{status}: {run} {task} fold {fold}")
    if not merged:
        print(f"nothing to merge: {args.src} has no model_scores/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
