"""Write a run's result files as run_matbench.py lays them out, for tests that
build partial or altered copies of a real run."""

import json
from pathlib import Path

from mat_bench.data import preds_file, write_json


def write_run(dest: Path, run: str, scores: dict, preds: dict) -> Path:
    """DEST/model_scores/RUN.json and DEST/model_preds/RUN/TASK.json.gz per task of
    `preds` (replacing any earlier predictions of the run); returns dest."""
    (dest / "model_scores").mkdir(parents=True, exist_ok=True)
    (dest / "model_scores" / f"{run}.json").write_text(json.dumps(scores))
    for old in (dest / "model_preds" / run).glob("*.json.gz"):
        old.unlink()
    for task, folds in preds.items():
        path = preds_file(dest / "model_preds", run, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {task: folds})
    return dest
