"""[overhead] One KSPOracle call vs the raw petsc4py solve it wraps (Poisson2D(64), CG + Jacobi).

Both sides build a fresh KSP, set it up and solve from a zero guess to rtol 1e-6, alternating
call by call so machine noise hits both equally; the ratio of medians is the oracle's overhead
(options bookkeeping, the unused-option check, the residual history, the Outcome).

Timing of machinery: it calls the oracle, one of the library's internals, directly; it trains
nothing (`tests/test_benchmarks_measure_product.py`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from metasolve.app.report import markdown_table
from problems import Poisson2D
from solvers import KSPOracle, PETSc


def raw_solve(A: PETSc.Mat, b: PETSc.Vec) -> int:
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setType("cg")
    ksp.getPC().setType("jacobi")
    ksp.setTolerances(rtol=1e-6, atol=1e-50, max_it=10_000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setFromOptions()
    x = A.createVecRight()
    ksp.solve(b, x)
    iterations = ksp.getIterationNumber()
    ksp.destroy()
    x.destroy()
    return iterations


def run(out: Path, quick: bool = False) -> dict:
    task = Poisson2D(n=64).eval_tasks(1)[0]
    A, b = task.petsc(PETSc.COMM_SELF)
    oracle = KSPOracle(ksp_type="cg", pc_type="jacobi", rtol=1e-6)
    repeats = 10 if quick else 60
    raw_times, oracle_times = [], []
    iterations = set()
    for _ in range(repeats):
        begin = time.perf_counter()
        iterations.add(raw_solve(A, b))
        raw_times.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        iterations.add(oracle(task).iterations)
        oracle_times.append(time.perf_counter() - begin)
    ratio = float(np.median(oracle_times) / np.median(raw_times))
    rows = [{"measure": "raw petsc4py solve (median ms)", "value": 1e3 * float(np.median(raw_times))},
            {"measure": "KSPOracle call (median ms)", "value": 1e3 * float(np.median(oracle_times))},
            {"measure": "ratio oracle / raw (goal <= 1.05)", "value": ratio}]
    verdict = "met" if ratio <= 1.05 else "missed"
    markdown = (f"Poisson2D(64) (4096 unknowns), CG + Jacobi, rtol 1e-6, {repeats} alternating calls; "
                f"both sides took {sorted(iterations)} iterations.\n\n{markdown_table(rows)}\n\n"
                f"Goal ratio <= 1.05: **{verdict}**.")
    return {"summary": rows, "ratio": ratio, "iterations": sorted(iterations), "markdown": markdown}
