"""Shared test set-up: real Matbench data from ../shared (or $MATBENCH_RAW_DIR), and
featurized files in a per-session folder so tests never touch the user's data/."""

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "matbench"

if not os.environ.get("MATBENCH_RAW_DIR") and SHARED.is_dir():
    os.environ["MATBENCH_RAW_DIR"] = f"{SHARED}/raw:{SHARED}/compositions"
if not os.environ.get("MATBENCH_BENCHMARKS_DIR") and (SHARED / "benchmarks").is_dir():
    os.environ["MATBENCH_BENCHMARKS_DIR"] = str(SHARED / "benchmarks")
# must happen before mat_bench is imported: DATA_PATHS is read from it at import
_DATA_DIR = tempfile.mkdtemp(prefix="mat_bench_test_data_")
os.environ["MATBENCH_DATA_DIR"] = _DATA_DIR
os.environ.setdefault("WANDB_SILENT", "true")
if not os.environ.get("BROWSER_PATH") and os.path.exists("/usr/bin/chromium"):
    os.environ["BROWSER_PATH"] = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def featurized():
    """Call featurized(task, ...) to featurize tasks for real (once per session)."""
    from mat_bench.featurize_matbench import featurize

    done: dict[str, object] = {}

    def make(*tasks: str) -> dict[str, object]:
        todo = [t for t in tasks if t not in done]
        if todo:
            summary = featurize(todo, workers=2)
            for task in todo:
                done[task] = summary.loc[task]
        return {task: done[task] for task in tasks}

    return make
