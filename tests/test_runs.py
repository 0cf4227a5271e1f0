"""runs.py, the scripts' shared bookkeeping: hyperparameters with one home, flags and
--help derived from them, scripts that import library modules only."""

import ast
import dataclasses
from pathlib import Path

import pytest

from mat_bench.data import UserError
from mat_bench.runs import (
    DEFAULTS,
    HYPERPARAMETERS,
    build_run_parser,
    check_model_task,
    checkpoint_path,
    preds_path,
    scores_path,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("run_matbench", "slurm_submit", "run_folds", "featurize_matbench",
           "make_plots", "make_submission", "compare_spglib_vs_aflow_wyckoff_labels",
           "wandb_api", "benchmark_training")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_import_library_modules_only(script):
    tree = ast.parse((REPO / f"{script}.py").read_text())
    imported = {node.module.split(".")[1] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("mat_bench.")}
    imported |= {alias.name.split(".")[1] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names
                 if alias.name.startswith("mat_bench.")}
    assert not imported & set(SCRIPTS), f"{script} imports {imported & set(SCRIPTS)}"


def test_flags_defaults_and_help_come_from_hyperparameters():
    parser = build_run_parser()
    args = vars(parser.parse_args(["--model", "roostformer", "--task", "t",
                                   "--fold", "0"]))
    for key, default in DEFAULTS.items():
        want = list(default) if isinstance(default, tuple) else default
        assert args[key] == want, key
    text = parser.format_help()
    for key in HYPERPARAMETERS:
        assert f"--{key.replace('_', '-')}" in text
    assert "(default: 300)" in text and "(default: 0.001)" in text
    assert "(default: 0.0)" in text  # dropout's zero is shown, not taken for False
    # switches take --x / --no-x, typed flags parse their type
    args = vars(parser.parse_args(["--model", "roostformer", "--task", "t", "--fold",
                                   "0", "--gate", "--no-amp", "--batch-size", "64",
                                   "--frac-jitter", "0.02"]))
    assert args["gate"] is True and args["amp"] is False
    assert args["batch_size"] == 64 and args["frac_jitter"] == 0.02


def test_train_config_defaults_are_the_run_defaults():
    from mat_bench.training import TrainConfig

    cfg = TrainConfig(task_type="regression")
    for field in dataclasses.fields(cfg):
        if field.name in DEFAULTS and DEFAULTS[field.name] is not None:
            assert getattr(cfg, field.name) == DEFAULTS[field.name], field.name


def test_help_of_every_script_shows_examples_as_written(capsys):
    import importlib

    for script in ("run_matbench", "run_folds", "slurm_submit"):
        module = importlib.import_module(f"mat_bench.{script}")
        with pytest.raises(SystemExit):
            module.main(["--help"])
        out = capsys.readouterr().out
        assert "Examples:" in out and "\\\n" in out, script  # continuation lines kept
        assert "(default: " in out


def test_result_paths():
    assert scores_path("out", "r") == Path("out/model_scores/r.json")
    assert preds_path("out", "r", "matbench_glass") == Path(
        "out/model_preds/r/matbench_glass.json.gz")
    assert checkpoint_path("out", "r", "matbench_glass", [0, 1], 1) == Path(
        "out/checkpoints/r/matbench_glass-folds_0-1-ensemble_1.pt")
    assert checkpoint_path("out", "r", "matbench_glass", [2], 1).name == (
        "matbench_glass-fold_2.pt")


def test_model_task_checks():
    check_model_task("wrenformer", "matbench_phonons")
    with pytest.raises(UserError, match="composition-only task: use --model roost"):
        check_model_task("wrenformer", "matbench_steels")
    with pytest.raises(UserError, match="unknown model 'roost'"):
        check_model_task("roost", "matbench_steels")
    with pytest.raises(UserError, match="unknown task"):
        check_model_task("roostformer", "matbench_nope")


def test_at_defaults_tells_current_runs_from_history():
    from mat_bench.runs import at_defaults

    params = {**DEFAULTS, "amp": True, "seed": 3,
              "embedding_aggregations": list(DEFAULTS["embedding_aggregations"])}
    assert at_defaults(params)
    del params["gate"]  # a run before --gate existed had none: today's default
    assert at_defaults(params)
    assert not at_defaults({**params, "epochs": 30})
    assert not at_defaults({**params, "d_model": 32})


def test_runs_before_a_hyperparameter_existed_did_without_it():
    from mat_bench.runs import BEFORE_IT_EXISTED, at_defaults, recorded_params

    old = {key: DEFAULTS[key] for key in DEFAULTS if key not in BEFORE_IT_EXISTED}
    assert recorded_params(old)["frac_jitter"] == 0.0
    assert recorded_params(old)["ensemble_aggregation"] == "mean"
    assert not at_defaults(old)  # trained without today's jitter: history
    assert set(BEFORE_IT_EXISTED) <= set(DEFAULTS)


def test_hyperparameters_that_do_not_act_are_not_compared():
    """Roostformer ignores --wyckoff-features, classification --gate: a run differs
    from the defaults, or a checkpoint from a run, only where it acts."""
    from mat_bench import runs

    other = "raw" if DEFAULTS["wyckoff_features"] == "max" else "max"
    roost = {**DEFAULTS, "model": "roostformer", "task": "matbench_glass"}
    wren = {**DEFAULTS, "model": "wrenformer", "task": "matbench_phonons"}
    assert runs.acts("wyckoff_features", "wrenformer", "matbench_phonons")
    assert not runs.acts("wyckoff_features", "roostformer", "matbench_phonons")
    assert not runs.acts("gate", "roostformer", "matbench_glass")
    assert not runs.acts("val_threshold", "roostformer", "matbench_steels")
    assert runs.at_defaults(wren) and runs.at_defaults(roost)
    assert runs.at_defaults({**roost, "wyckoff_features": other, "gate": True})
    assert not runs.at_defaults({**wren, "wyckoff_features": other})
    # runs recorded before the flag existed had raw features: Roostformer's stay
    # current, Wrenformer's are history now that the default is max
    assert DEFAULTS["wyckoff_features"] == "max"
    old_roost = {k: v for k, v in roost.items() if k != "wyckoff_features"}
    assert runs.at_defaults(old_roost)
    assert not runs.at_defaults({k: v for k, v in wren.items()
                                 if k != "wyckoff_features"})
    assert runs.recipe(old_roost) == runs.recipe({**roost, "wyckoff_features": other})


def test_wyckoff_features_choice_is_checked():
    from mat_bench.runs import check_args

    with pytest.raises(UserError, match="--wyckoff-features must be raw or max"):
        check_args("wrenformer", "matbench_phonons", 0,
                   {**DEFAULTS, "wyckoff_features": "unit"}, "disabled", "none")


def test_renamed_hyperparameters_keep_their_old_names_working():
    from mat_bench.runs import RENAMED, recorded_params

    parser = build_run_parser()
    args = vars(parser.parse_args(["--model", "roostformer", "--task", "t", "--fold",
                                   "0", "--n-heads", "2", "--frac-encoding", "8"]))
    assert args["n_attn_heads"] == 2 and args["frac_encoding_dims"] == 8
    old = recorded_params({"n_heads": 2, "frac_encoding": 8})
    assert old["n_attn_heads"] == 2 and old["frac_encoding_dims"] == 8
    assert not set(RENAMED) & set(old)
