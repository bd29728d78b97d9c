"""The first half of `metasolve demo`: every built-in family solved by PETSc at default settings."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from problems import make_family
from solvers import KSPOracle

SHOWCASE = [
    ("poisson1d", {"n": 31}, KSPOracle(ksp_type="richardson", pc_type="jacobi", rtol=1e-6)),
    ("poisson2d", {"n": 32}, KSPOracle(ksp_type="cg", pc_type="jacobi", rtol=1e-6)),
    ("diffusion", {"n_range": (16, 32)}, KSPOracle(ksp_type="cg", pc_type="jacobi", rtol=1e-6)),
    ("convdiff", {"n_range": 32}, KSPOracle(ksp_type="gmres", pc_type="ilu", rtol=1e-6)),
]


def family_table(tasks_per_family: int = 4) -> list[dict]:
    """Median iterations, final relative residual and solve time per family (zero initial guess)."""
    rows = []
    for name, params, oracle in SHOWCASE:
        family = make_family(name, **params)
        outcomes = [(task, oracle(task)) for task in family.eval_tasks(tasks_per_family)]
        rows.append({
            "family": name,
            "solver": f"{oracle.ksp_type}+{oracle.pc_type}",
            "tasks": tasks_per_family,
            "unknowns": int(np.median([t.size for t, _ in outcomes])),
            "median iterations": float(np.median([o.iterations for _, o in outcomes])),
            "max rel. residual": max(float(o.residuals[-1] / np.linalg.norm(t.b)) for t, o in outcomes),
            "median ms": 1e3 * float(np.median([o.setup_seconds + o.seconds for _, o in outcomes])),
            "converged": sum(o.converged for _, o in outcomes),
        })
    return rows


def demo(out: Path) -> None:
    """`metasolve demo`: each built-in family solved by PETSc, then the default predictor trained
    by the run layer on the demo's config (metasolve/app/demo.toml) — the config whose result
    benchmarks/results/newton.md reports."""
    from metasolve.app.config import parse_config
    from metasolve.app.report import markdown_table
    from metasolve.app.run import make_executor, run

    executor = make_executor()
    if executor.is_root:
        print("metasolve demo 1/2: the built-in problem families solved by PETSc (default settings)", flush=True)
        print(markdown_table(family_table()), flush=True)
        print("\nmetasolve demo 2/2: learn an initial guess for PETSc Newton (SNES newtonls + LU) on Bratu "
              "near the fold (config: metasolve/app/demo.toml)", flush=True)
    config = parse_config(resources.files("metasolve.app").joinpath("demo.toml").read_text(), "metasolve/app/demo.toml")
    run(config, out, overwrite=True, executor=executor)  # a demonstration: running it again replaces the last one
