"""Wyckoff (protostructure) labels of crystal structures, the input Wrenformer reads:
one implementation for featurize_matbench.py and the label comparison script.

A label is pymatgen's protostructure label (an AFLOW-style prototype label with the
chemical system, e.g. AB_cF8_225_a_b:Ba-Te) from spglib, moyopy or AFLOW's own
`aflow --prototype`, at a symmetry tolerance `symprec`. Labelling never raises: a
structure a tool cannot label gives (None, the reason).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence
from functools import partial

from tqdm import tqdm

TOOLS = ("spglib", "moyopy", "aflow")
TOOL = "spglib"  # what featurize_matbench.py labels with, as the original did
SYMPREC = 0.1  # symmetry tolerance in Angstrom, as the original's


def aflow_label(struct, symprec: float, executable: str = "aflow") -> str:
    """Label from `aflow --prototype` at tolerance `symprec`, built and checked like
    pymatgen's get_protostructure_label_from_aflow, which has no tolerance option
    (and, in pymatgen 2026.10, loses the Wyckoff letters of AFLOW's labels). Raises
    on failure."""
    from pymatgen.analysis.prototypes import (
        canonicalize_element_wyckoffs,
        get_formula_from_protostructure_label,
    )
    from pymatgen.core import Composition

    proc = subprocess.run(
        [executable, "--prototype", "--print=json", f"--tolerance={symprec}"],
        input=struct.to(fmt="poscar"), text=True, capture_output=True, check=True,
        timeout=600,
    )
    formula, pearson, spg_num, *wyckoffs = json.loads(proc.stdout)[
        "aflow_prototype_label"].split("_")
    # canonicalize_element_wyckoffs needs explicit counts (a2b -> 1a2b): without them
    # it drops the letters, as pymatgen's own AFLOW function does ("AB_cF8_225__")
    counted = "_".join(re.sub(r"(?<![0-9])([a-zA-Z])", r"1\1", wyk) for wyk in wyckoffs)
    wyckoffs = canonicalize_element_wyckoffs(counted, spg_num)
    label = f"{formula}_{pearson}_{spg_num}_{wyckoffs}:{struct.chemical_system}"
    # the Wyckoff multiplicities must reproduce the structure's composition
    observed = Composition(get_formula_from_protostructure_label(label)).reduced_formula
    if observed != struct.composition.reduced_formula:
        raise ValueError(f"Invalid WP multiplicities - {label}, expected {observed} "
                         f"to be {struct.composition.reduced_formula}")
    return label


def protostructure_label(struct, tool: str = TOOL, symprec: float = SYMPREC
                         ) -> tuple[str | None, str | None]:
    """(label, None) for a structure, or (None, why) if the tool cannot label it.
    Never raises for a structure; ValueError for an unknown tool."""
    from pymatgen.analysis import prototypes

    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}: choose from {', '.join(TOOLS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tool == "spglib":
                label = prototypes.get_protostructure_label_from_spglib(
                    struct, raise_errors=True, init_symprec=symprec)
            elif tool == "moyopy":
                label = prototypes.get_protostructure_label_from_moyopy(
                    struct, raise_errors=True, symprec=symprec)
            else:
                label = aflow_label(struct, symprec)
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or "").strip()[:200]
        return None, f"aflow failed ({exc.returncode}): {why}"
    except Exception as exc:  # the tools fail on a structure in many types
        return None, f"{type(exc).__name__}: {exc}"[:300]
    if not label:
        return None, f"{tool} returned no label"
    return label, None


def _ignore_sigint() -> None:
    """Labelling workers leave Ctrl-C to the main process, which stops them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def label_structures(structures: Sequence, tool: str = TOOL, symprec: float = SYMPREC,
                     workers: int = 1, desc: str = "labelling"
                     ) -> list[tuple[str | None, str | None]]:
    """protostructure_label of each structure, in input order, over `workers`
    processes, with a progress bar."""
    func = partial(protostructure_label, tool=tool, symprec=symprec)
    chunksize = max(1, min(256, len(structures) // (4 * max(workers, 1)) or 1))
    if workers <= 1:
        return [func(s) for s in tqdm(structures, desc=desc, mininterval=2)]
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
        return list(tqdm(pool.imap(func, structures, chunksize=chunksize),
                         total=len(structures), desc=desc, mininterval=2))
