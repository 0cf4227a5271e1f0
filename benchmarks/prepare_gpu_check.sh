#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh and gpu_runs.sh carry to a GPU machine that has PyTorch,
# numpy, pandas and scikit-learn but no network: wheels of this project's other
# runtime imports for CPython 3.12 in .whl/, and featurized tasks in .devdata/data
# (both git-ignored). Run from an activated venv with the project installed and
# MATBENCH_RAW_DIR set (see README "Offline").
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(aviary-models pymatgen pymatgen-core monty ruamel.yaml orjson palettable
  uncertainties spglib platformdirs matbench filelock)
pins=()
for pkg in "${pkgs[@]}"; do
  pins+=("$pkg==$(python -c "import importlib.metadata as m; print(m.version('$pkg'))")")
done
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# pymatgen reads bibtexparser 1.x, which PyPI has as a source archive only
python -m pip wheel -q --no-deps -w .whl \
  "bibtexparser==$(python -c "import importlib.metadata as m; print(m.version('bibtexparser'))")"
# every task, for benchmarks/gpu_runs.sh (about 4.5 MB; featurized tasks are skipped)
MATBENCH_DATA_DIR="$PWD/.devdata/data" python featurize_matbench.py
du -sh .whl .devdata
