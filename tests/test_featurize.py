"""featurize_matbench.py and wyckoff.py on real Matbench data: Wyckoff labels of
structures, composition tasks, unlabellable structures kept, atomic files."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from mat_bench import DATA_PATHS
from mat_bench.data import (
    load_featurized,
    load_raw_task,
)
from mat_bench.featurize_matbench import featurize
from mat_bench.wyckoff import protostructure_label


# --- featurization ------------------------------------------------------------------
def test_featurize_phonons_labels_nearly_all_and_match_spglib(featurized):
    summary = featurized("matbench_phonons")["matbench_phonons"]
    assert summary["rows"] == 1265
    assert summary["labelled"] + summary["failed"] == 1265
    assert summary["labelled"] >= 1250
    df = load_featurized("matbench_phonons")
    assert len(df) == 1265 and df.index[0] == "mb-phonons-0001"
    assert df.protostructure.notna().sum() == summary["labelled"]
    raw = load_raw_task("matbench_phonons")
    np.testing.assert_allclose(df.target, raw.target)
    for mbid in ["mb-phonons-0001", "mb-phonons-0100", "mb-phonons-0777",
                 "mb-phonons-1265"]:
        label = df.protostructure[mbid]
        spg_num = SpacegroupAnalyzer(raw.structure[mbid],
                                     symprec=0.1).get_space_group_number()
        assert label.split(":")[0].split("_")[2] == str(spg_num)
        assert label.split(":")[1] == raw.structure[mbid].chemical_system
    assert df.protostructure["mb-phonons-0001"] == "AB_cF8_225_a_b:Ba-Te"


def test_featurize_composition_tasks_skip_and_force(featurized):
    featurized("matbench_steels", "matbench_jdft2d")
    steels = load_featurized("matbench_steels")
    assert len(steels) == 312 and "protostructure" not in steels
    jdft2d = load_featurized("matbench_jdft2d")  # structure task, no structures here
    assert len(jdft2d) == 636 and "protostructure" not in jdft2d
    before = os.path.getmtime(DATA_PATHS["matbench_steels"])
    summary = featurize(["matbench_steels"])
    assert "already done" in summary.loc["matbench_steels", "note"]
    assert os.path.getmtime(DATA_PATHS["matbench_steels"]) == before
    summary = featurize(["matbench_steels"], force=True)
    assert summary.loc["matbench_steels", "rows"] == 312


def test_unlabellable_structure_is_recorded_not_dropped(featurized, monkeypatch):
    featurized("matbench_phonons")
    raw = load_raw_task("matbench_phonons").iloc[:6].copy()
    # a 0.01 A cell: spglib cannot determine the symmetry of this "crystal"
    broken = Structure(Lattice.cubic(0.01), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    raw.at[raw.index[2], "structure"] = broken
    label, error = protostructure_label(broken)
    assert label is None and error
    import mat_bench.featurize_matbench as fm

    monkeypatch.setattr(fm, "load_raw_task", lambda task: raw)
    monkeypatch.setitem(DATA_PATHS, "matbench_phonons", str(Path(DATA_PATHS[
        "matbench_phonons"]).with_name("broken.csv.gz")))
    summary = fm.featurize_task("matbench_phonons", workers=1)
    assert (summary["rows"], summary["labelled"], summary["failed"]) == (6, 5, 1)
    df = pd.read_csv(DATA_PATHS["matbench_phonons"], index_col="mbid")
    assert len(df) == 6 and df.protostructure.isna().sum() == 1
    assert isinstance(df.label_error.iloc[2], str)


def test_killed_featurize_leaves_old_file_intact(featurized, monkeypatch):
    featurized("matbench_steels")
    path = DATA_PATHS["matbench_steels"]
    before = Path(path).read_bytes()

    def crash(self, *args, **kwargs):
        Path(args[0]).write_text("half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(KeyboardInterrupt):
        featurize(["matbench_steels"], force=True)
    assert Path(path).read_bytes() == before
    assert not [p for p in os.listdir(Path(path).parent) if p.endswith(".tmp")]


def test_unknown_task_in_featurize(capsys):
    from mat_bench.featurize_matbench import main

    assert main(["--tasks", "matbench_foo"]) == 2
    assert "unknown task 'matbench_foo'" in capsys.readouterr().err
