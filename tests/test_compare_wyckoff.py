"""Tests of compare_spglib_vs_aflow_wyckoff_labels.py on real matbench_phonons
structures (the first 100 of them, to stay quick). AFLOW cannot be installed here: its
code path runs against a stand-in `aflow` executable that answers with labels
computed beforehand."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pandas as pd
import pytest

from mat_bench.compare_spglib_vs_aflow_wyckoff_labels import (
    cache_path,
    compare_labels,
    crystal_system,
    label_structure,
    main,
    oc_pearson,
    spg_num_from_label,
)
from mat_bench.data import find_raw_file, load_raw_task

TASK = "matbench_phonons"
N_STRUCTURES = 100
SHARED = Path(__file__).resolve().parents[2] / "shared" / "matbench"

if not os.environ.get("MATBENCH_RAW_DIR") and SHARED.is_dir():
    os.environ["MATBENCH_RAW_DIR"] = f"{SHARED / 'raw'}:{SHARED / 'compositions'}"
if not os.environ.get("BROWSER_PATH") and shutil.which("chromium"):
    os.environ["BROWSER_PATH"] = shutil.which("chromium")

needs_phonons = pytest.mark.skipif(
    find_raw_file(TASK) is None or not str(find_raw_file(TASK)).endswith(".json.gz"),
    reason=f"{TASK}.json.gz (with structures) not found in MATBENCH_RAW_DIR",
)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compare_wyckoff")


@pytest.fixture(scope="module")
def result(out_dir: Path) -> dict:
    """spglib vs moyopy on the first 100 phonons structures, figures included."""
    if find_raw_file(TASK) is None:
        pytest.skip(f"{TASK} data not found in MATBENCH_RAW_DIR")
    return compare_labels(TASK, 0.1, out_dir, tools=["spglib", "moyopy"],
                          workers=2, limit=N_STRUCTURES)


# --- helpers ------------------------------------------------------------------------
def test_spg_num_from_label() -> None:
    assert spg_num_from_label("AB_cF8_225_a_b:Ba-Te") == 225
    assert spg_num_from_label("ABCD_hP4_156_b_a_a_c:Ba-Ga-H-Si") == 156
    assert spg_num_from_label("A2BC2_oC20_36_2a_a_2a:Na-Pt-S") == 36
    # failures are error messages, not labels
    assert (
        spg_num_from_label("Invalid WP multiplicities - AB_cF8_225_a_b:Ba-Te") is None
    )
    assert spg_num_from_label("RuntimeError: symmetry search failed") is None
    assert spg_num_from_label("AB_cF8_231_a_b:Ba-Te") is None
    assert spg_num_from_label(float("nan")) is None


def test_crystal_system_boundaries() -> None:
    expected = {1: "triclinic", 2: "triclinic", 3: "monoclinic", 15: "monoclinic",
                16: "orthorhombic", 74: "orthorhombic", 75: "tetragonal",
                142: "tetragonal", 143: "trigonal", 167: "trigonal", 168: "hexagonal",
                194: "hexagonal", 195: "cubic", 230: "cubic"}
    assert {num: crystal_system(num) for num in expected} == expected
    assert crystal_system(None) is None


def test_oc_pearson() -> None:
    assert (
        oc_pearson("A2BC2_oS20_36_2a_a_2a:Na-Pt-S") == "A2BC2_oC20_36_2a_a_2a:Na-Pt-S"
    )
    assert oc_pearson("AB_cF8_225_a_b:Ba-Te") == "AB_cF8_225_a_b:Ba-Te"


def test_label_structure_never_raises() -> None:
    for tool in ("spglib", "moyopy"):
        label = label_structure(tool, "not a structure", 0.1)
        assert isinstance(label, str) and spg_num_from_label(label) is None


# --- real structures ----------------------------------------------------------------
@needs_phonons
def test_labels_of_real_structures(result: dict) -> None:
    table = result["table"]
    assert len(table) == N_STRUCTURES
    assert table.index[0] == "mb-phonons-0001"
    assert table.loc["mb-phonons-0001", "spglib"] == "AB_cF8_225_a_b:Ba-Te"
    assert table.loc["mb-phonons-0001", "moyopy"] == "AB_cF8_225_a_b:Ba-Te"
    assert table.loc["mb-phonons-0001", "spglib_crys_sys"] == "cubic"
    timing = result["timing"]
    assert list(timing.index) == ["spglib", "moyopy"]
    assert (timing.n_structures == N_STRUCTURES).all()
    assert (timing.source == "computed now").all()
    assert (timing["ms per structure"] > 0).all()


@needs_phonons
def test_agreement_table(result: dict) -> None:
    row = result["agreement"].loc["spglib vs moyopy"]
    assert row.n_both_labelled == N_STRUCTURES - result["timing"].n_failed.max()
    for col in ("% identical label", "% identical (oS = oC)", "% same spg",
                "% same crystal system"):
        assert 0 <= row[col] <= 100
    # identical labels imply the same space group, which implies the same system
    assert (row["% identical label"] <= row["% identical (oS = oC)"]
            <= row["% same spg"] <= row["% same crystal system"])
    # both tools agree on nearly all space groups at symprec 0.1
    assert row["% same spg"] > 95


@needs_phonons
def test_disagreements_csv(result: dict) -> None:
    table, diff = result["table"], result["disagreements"]
    differ = table.spglib != table.moyopy
    assert sorted(diff.index) == sorted(table.index[differ])
    path = next(p for p in result["files"] if p.endswith("_disagreements.csv"))
    written = pd.read_csv(path, index_col="mbid")
    assert list(written.index) == list(diff.index)
    assert {
        "disagreeing_pairs", "composition", "spglib", "moyopy", "spglib_spg"
    } <= set(written.columns)
    assert (written.disagreeing_pairs == "spglib/moyopy").all()


@needs_phonons
def test_figures_written(result: dict, out_dir: Path) -> None:
    prefix = f"{TASK}_symprec0.1"
    stems = [f"{prefix}_sankey_spg_spglib_vs_moyopy",
             f"{prefix}_sankey_crys_sys_spglib_vs_moyopy",
             f"{prefix}_sunburst_spg_spglib"]
    for stem in stems:
        html = out_dir / f"{stem}.html"
        assert html.is_file() and "plotly.min.js" in html.read_text()
    assert (out_dir / "plotly.min.js").is_file()  # the HTML files work offline
    if os.environ.get("BROWSER_PATH"):  # PNG export needs Chrome/Chromium
        for stem in stems:
            png = out_dir / f"{stem}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out_dir.glob("*.tmp*"))  # no leftovers of atomic writes


@needs_phonons
def test_rerun_uses_cache(result: dict, out_dir: Path, monkeypatch) -> None:
    import mat_bench.compare_spglib_vs_aflow_wyckoff_labels as module

    def fail(*args, **kwargs):
        raise AssertionError("labels recomputed despite the cache")

    monkeypatch.setattr(module, "compute_labels", fail)
    again = compare_labels(TASK, 0.1, out_dir, tools=["spglib", "moyopy"],
                           limit=N_STRUCTURES, png=False)
    assert (again["timing"].source == "cache").all()
    pd.testing.assert_frame_equal(again["table"], result["table"])
    assert cache_path(out_dir, TASK, "spglib", 0.1).is_file()


@needs_phonons
def test_cache_extends_to_new_structures(
    result: dict, out_dir: Path, monkeypatch
) -> None:
    import mat_bench.compare_spglib_vs_aflow_wyckoff_labels as module

    computed = []
    real = module.compute_labels

    def counting(tool, structures, symprec, workers=2):
        computed.append(len(structures))
        return real(tool, structures, symprec, workers=1)

    monkeypatch.setattr(module, "compute_labels", counting)
    more = compare_labels(TASK, 0.1, out_dir, tools=["spglib", "moyopy"],
                          limit=N_STRUCTURES + 5, png=False)
    assert computed == [5, 5]  # only the new structures, for each tool
    assert len(more["table"]) == N_STRUCTURES + 5
    assert (more["timing"].source == "cache + 5 computed").all()
    cached = pd.read_csv(cache_path(out_dir, TASK, "moyopy", 0.1), index_col="mbid")
    assert len(cached) == N_STRUCTURES + 5


@needs_phonons
def test_cli_prints_agreement_table_last(result: dict, out_dir: Path, capsys,
                                         monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no aflow
    code = main(["--task", TASK, "--out-dir", str(out_dir), "--limit",
                 str(N_STRUCTURES), "--no-png"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no `aflow` binary on PATH" in captured.out
    lines = captured.out.rstrip().splitlines()
    assert lines[-1].startswith("spglib vs moyopy")
    assert "% same spg" in lines[-2] and "% same crystal system" in lines[-2]
    assert "agreement between tools" in lines[-3]


# --- AFLOW through a stand-in executable --------------------------------------------
@needs_phonons
def test_aflow_stand_in(tmp_path: Path, monkeypatch) -> None:
    """A fake `aflow` that prints the AFLOW label (label without `:chemsys`) that
    spglib gives at the tolerance it was called with, looked up by POSCAR text;
    it fails for one structure. Checks the plumbing: command line, JSON parsing,
    canonical label, failures counted, the spglib-vs-aflow pair by default."""
    df = load_raw_task(TASK).iloc[:6]
    answers = {
        struct.to(fmt="poscar"): label_structure("spglib", struct, 0.05).split(":")[0]
        for struct in df.structure.iloc[:5]
    }
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    fake = tmp_path / "bin" / "aflow"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
assert "--prototype" in args and "--print=json" in args, args
assert "--tolerance=0.05" in args, args
answers = json.load(open({str(tmp_path / "answers.json")!r}))
poscar = sys.stdin.read()
if poscar not in answers:
    sys.exit("ERROR - unknown structure")
print(json.dumps({{"aflow_prototype_label": answers[poscar]}}))
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    res = compare_labels(TASK, 0.05, tmp_path / "out", workers=1, limit=6, png=False)
    assert list(res["timing"].index) == ["spglib", "moyopy", "aflow"]
    assert res["timing"].loc["aflow", "n_failed"] == 1
    assert "unknown structure" in res["table"].aflow.iloc[5]
    row = res["agreement"].loc["spglib vs aflow"]
    assert row.n_both_labelled == 5 and row["% identical label"] == 100
    assert set(res["agreement"].index) == {
        "spglib vs moyopy", "spglib vs aflow", "moyopy vs aflow"}
    assert any("sankey_spg_spglib_vs_aflow" in path for path in res["files"])
    assert res["notes"] == []


# --- user errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "matbench_nope"], "unknown task 'matbench_nope'"),
        (["--task", "matbench_steels"], "compositions only"),
        (["--symprec", "0"], "not a valid tolerance"),
        (["--symprec", "-0.1"], "not a valid tolerance"),
        (["--symprec", "nan"], "not a valid tolerance"),
        (["--symprec", "5"], "not a valid tolerance"),
        (["--workers", "0"], "--workers"),
        (["--pair", "spglib", "spglib"], "pick two different tools"),
    ],
)
def test_cli_user_errors(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = main([*argv, "--out-dir", str(tmp_path), "--limit", "2", "--no-png"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_aflow_pair_without_aflow(tmp_path: Path, capsys, monkeypatch) -> None:
    if find_raw_file(TASK) is None:
        pytest.skip(f"{TASK} data not found")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    code = main(["--pair", "spglib", "aflow", "--out-dir", str(tmp_path),
                 "--limit", "2", "--no-png"])
    err = capsys.readouterr().err
    assert code == 2 and "no `aflow` binary on PATH" in err


def test_cli_task_without_structures(tmp_path: Path, capsys) -> None:
    """matbench_dielectric is a structure task, but only its composition table is
    available here."""
    path = find_raw_file("matbench_dielectric")
    if path is None or str(path).endswith(".json.gz"):
        pytest.skip("needs the composition table only of matbench_dielectric")
    code = main(["--task", "matbench_dielectric", "--out-dir", str(tmp_path),
                 "--limit", "2", "--no-png"])
    err = capsys.readouterr().err
    assert code == 2 and "no structures for matbench_dielectric" in err
