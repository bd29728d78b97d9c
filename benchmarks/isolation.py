"""[isolation] What crash isolation costs per solve, and the crash it survives.

Overhead: the same KSP solves (Poisson2D, Richardson + SOR, a fixed number of iterations, so every
call does identical work) in-process and through `IsolatedOracle`, alternating, timed from the
caller (pipe round trip and pickling included), median over repeats; one call solves a task's
centre and two queries together, as training does. The crash: PETSc 3.26.1's own Chebyshev +
Jacobi segfault (no deliberate fault), run unisolated in a child process to show it is real;
`tests/test_isolated.py` trains through segfaults and survives this one.
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import numpy as np

from metasolve.app.report import markdown_table
from problems import Poisson2D
from solvers import IsolatedOracle, KSPOracle

SIZES = [(16, 100), (48, 300), (96, 400), (128, 800)]
"""(grid n, iterations): from well under a millisecond to tens of milliseconds per solve."""


def overhead(n: int, iterations: int, repeats: int) -> dict:
    recipe = functools.partial(KSPOracle, ksp_type="richardson", pc_type="sor", rtol=0.0, atol=0.0,
                               max_it=iterations)
    direct, isolated = recipe(), IsolatedOracle(recipe)
    try:
        task = Poisson2D(n).eval_tasks(1)[0]
        rng = np.random.default_rng(0)
        settings = [{"x0": rng.standard_normal(n * n)} for _ in range(3)]
        for oracle in (direct, isolated):
            oracle.solve_many(task, settings)  # first call: PETSc objects built, task sent
        seconds: dict[str, list[float]] = {"in-process": [], "isolated": []}
        for _ in range(repeats):
            for name, oracle in (("in-process", direct), ("isolated", isolated)):
                begin = time.perf_counter()
                oracle.solve_many(task, settings)
                seconds[name].append(time.perf_counter() - begin)
    finally:
        isolated.close()
    inside, outside = statistics.median(seconds["in-process"]), statistics.median(seconds["isolated"])
    return {"grid": f"{n}x{n}", "iterations": iterations, "ms_per_solve_in_process": 1e3 * inside / 3,
            "ms_per_solve_isolated": 1e3 * outside / 3, "ratio": outside / inside,
            "overhead_ms_per_call": 1e3 * (outside - inside)}


def crash_is_real() -> str:
    """The unisolated PETSc Chebyshev crash, reproduced in a child process (it would end this one)."""
    import subprocess
    import sys

    code = ("from solvers import KSPOracle; from tests.systems import poisson_2d; "
            "KSPOracle('chebyshev', 'jacobi', rtol=1e-30, atol=0.0, max_it=20000)(poisson_2d(16, 0))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parent.parent)
    return f"exit status {result.returncode}; " + (result.stderr.strip().splitlines() or [""])[-1][:200]


def run(out: Path, quick: bool = False) -> dict:
    repeats = 5 if quick else 30
    rows = [overhead(n, iterations, repeats) for n, iterations in (SIZES[:3] if quick else SIZES)]
    over_10ms = [r["ratio"] for r in rows if r["ms_per_solve_in_process"] >= 10]
    unisolated = crash_is_real()
    markdown = (f"{markdown_table(rows)}\n\nPer call: a task's centre and two queries (3 solves, `solve_many`), "
                f"median of {repeats}, timed from the caller, shared machine. Worst ratio on solves of >= 10 ms: "
                f"**{max(over_10ms) if over_10ms else float('nan'):.3f}x** (goal <= 1.2x: "
                f"{'met' if over_10ms and max(over_10ms) <= 1.2 else 'not measured' if not over_10ms else 'missed'}).\n\n"
                f"Unisolated, PETSc 3.26.1 Chebyshev + Jacobi on Poisson2D(16), 20,000 iterations: {unisolated}.\n")
    return {"summary": rows, "worst_ratio_over_10ms": max(over_10ms) if over_10ms else None,
            "unisolated_crash": unisolated, "markdown": markdown}
