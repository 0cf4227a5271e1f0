# Sourced by benchmarks/gpu_check.sh and gpu_runs.sh, from the repository root, on
# a GPU machine with PyTorch but without this project's other packages or network:
# installs the wheels in .whl/ (made by benchmarks/prepare_gpu_check.sh) into a
# scratch folder and points Python at them, at this checkout as mat_bench and at
# the featurized tasks in .devdata/data.
scratch=$(mktemp -d)
site="$scratch/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/*.whl || exit 1
# the package is the repository root (pyproject's package-dir), importable as mat_bench
mkdir -p "$scratch/pkg" && ln -sfn "$PWD" "$scratch/pkg/mat_bench"
# stand-in for wandb, which aviary.core imports at module level but which these
# scripts never use (runs are --wandb disabled); the real package is 20 MB of the
# 64 MB that may travel
mkdir -p "$scratch/stubs/wandb"
echo '"""Stand-in: runs here have W&B disabled."""' > "$scratch/stubs/wandb/__init__.py"
export PYTHONPATH="$scratch/pkg:$site:$scratch/stubs"
export MATBENCH_DATA_DIR="$PWD/.devdata/data" PYTHONUNBUFFERED=1
