"""Benchmark Roostformer and Wrenformer on Matbench v0.1.

The repository root is the package `mat_bench` (see pyproject.toml), so scripts and
tests import shared code as `from mat_bench.data import ...` wherever the clone lives.
"""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# featurized data sets live here (generated, never committed); override with an env var
DATA_DIR = os.environ.get("MATBENCH_DATA_DIR", os.path.join(ROOT, "data"))

# task -> (target column, task type, input type), as in Matbench v0.1's metadata
TASK_INFO: dict[str, tuple[str, str, str]] = {
    "matbench_steels": ("yield strength", "regression", "composition"),
    "matbench_jdft2d": ("exfoliation_en", "regression", "structure"),
    "matbench_phonons": ("last phdos peak", "regression", "structure"),
    "matbench_expt_gap": ("gap expt", "regression", "composition"),
    "matbench_dielectric": ("n", "regression", "structure"),
    "matbench_expt_is_metal": ("is_metal", "classification", "composition"),
    "matbench_glass": ("gfa", "classification", "composition"),
    "matbench_log_gvrh": ("log10(G_VRH)", "regression", "structure"),
    "matbench_log_kvrh": ("log10(K_VRH)", "regression", "structure"),
    "matbench_perovskites": ("e_form", "regression", "structure"),
    "matbench_mp_gap": ("gap pbe", "regression", "structure"),
    "matbench_mp_is_metal": ("is_metal", "classification", "structure"),
    "matbench_mp_e_form": ("e_form", "regression", "structure"),
}
ALL_TASKS = tuple(TASK_INFO)  # smallest to largest
STRUCTURE_TASKS = tuple(t for t, info in TASK_INFO.items() if info[2] == "structure")
COMPOSITION_TASKS = tuple(t for t, info in TASK_INFO.items() if info[2] == "composition")
CLASSIFICATION_TASKS = tuple(
    t for t, info in TASK_INFO.items() if info[1] == "classification"
)
REGRESSION_TASKS = tuple(t for t, info in TASK_INFO.items() if info[1] == "regression")
N_FOLDS = 5

# task name -> featurized data file written by featurize_matbench.py
DATA_PATHS: dict[str, str] = {
    task: os.path.join(DATA_DIR, f"{task}.csv.gz") for task in ALL_TASKS
}
