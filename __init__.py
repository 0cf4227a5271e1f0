"""Benchmark Roostformer and Wrenformer on Matbench v0.1.

The repository root is the package `mat_bench` (see pyproject.toml), so scripts and
tests import shared code as `from mat_bench.data import ...` wherever the clone lives.
"""

import os
from typing import NamedTuple

ROOT = os.path.dirname(os.path.abspath(__file__))
# featurized data sets live here (generated, never committed); override with an env var
DATA_DIR = os.environ.get("MATBENCH_DATA_DIR", os.path.join(ROOT, "data"))



# the metric Matbench ranks a task by; for classification, the ROC-AUC of the class
# labels (so the labels' balanced accuracy), as matbench scores a recorded fold
METRICS = {"regression": "mae", "classification": "rocauc"}
# the metric runs are compared by on validation splits: for classification the
# ROC-AUC of the class-1 probabilities, which ranks models more finely than one
# threshold's labels do
VAL_METRICS = {"regression": "mae", "classification": "rocauc_prob"}


class TaskInfo(NamedTuple):
    """A Matbench v0.1 task's metadata, as in matbench.metadata.mbv01_metadata."""

    target: str  # target column
    task_type: str  # "regression" or "classification"
    input_type: str  # "composition" or "structure"

    @property
    def metric(self) -> str:
        """The metric Matbench ranks the task by: mae or rocauc (of the labels)."""
        return METRICS[self.task_type]


TASK_INFO: dict[str, TaskInfo] = {  # smallest to largest
    "matbench_steels": TaskInfo("yield strength", "regression", "composition"),
    "matbench_jdft2d": TaskInfo("exfoliation_en", "regression", "structure"),
    "matbench_phonons": TaskInfo("last phdos peak", "regression", "structure"),
    "matbench_expt_gap": TaskInfo("gap expt", "regression", "composition"),
    "matbench_dielectric": TaskInfo("n", "regression", "structure"),
    "matbench_expt_is_metal": TaskInfo("is_metal", "classification", "composition"),
    "matbench_glass": TaskInfo("gfa", "classification", "composition"),
    "matbench_log_gvrh": TaskInfo("log10(G_VRH)", "regression", "structure"),
    "matbench_log_kvrh": TaskInfo("log10(K_VRH)", "regression", "structure"),
    "matbench_perovskites": TaskInfo("e_form", "regression", "structure"),
    "matbench_mp_gap": TaskInfo("gap pbe", "regression", "structure"),
    "matbench_mp_is_metal": TaskInfo("is_metal", "classification", "structure"),
    "matbench_mp_e_form": TaskInfo("e_form", "regression", "structure"),
}
ALL_TASKS = tuple(TASK_INFO)
STRUCTURE_TASKS = tuple(t for t, info in TASK_INFO.items()
                        if info.input_type == "structure")
# matbench's: a class-1 probability above this is class 1 (matbench.constants)
CLASS_THRESHOLD = 0.5
N_FOLDS = 5

# task name -> featurized data file written by featurize_matbench.py
DATA_PATHS: dict[str, str] = {
    task: os.path.join(DATA_DIR, f"{task}.csv.gz") for task in ALL_TASKS
}
