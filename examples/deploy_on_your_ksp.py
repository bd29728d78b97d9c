"""Use a trained meta-solver in front of a PETSc solve you wrote yourself.

    make demo                                   # trains runs/demo/meta_solver.pt
    .venv/bin/python examples/deploy_on_your_ksp.py runs/demo/meta_solver.pt

The KSP below is an ordinary petsc4py solve, configured the way the meta-solver was trained
(Richardson + SSOR, rtol 1e-6). `MetaSolver.apply` puts the predicted setting on it for one
solve: options go into the options database under the KSP's prefix (checked as read, removed
afterwards), an initial guess into the solution vector. A meta-solver trained on operator
features (`features = "operator"`) predicts for any `LinearSystem(A, b)` of yours, no family needed.
"""
from __future__ import annotations

import argparse
import time

from metasolve import MetaSolver
from problems import Poisson2D
from solvers import PETSc


def my_solver(A: PETSc.Mat) -> PETSc.KSP:
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOptionsPrefix("mycode_")
    ksp.setOperators(A)
    ksp.setType("richardson")
    ksp.getPC().setType("sor")
    ksp.setTolerances(rtol=1e-6, max_it=20_000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setMonitor(lambda *_: None)  # Richardson + SOR skips its convergence test without a monitor
    ksp.setFromOptions()
    return ksp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meta_solver", help="a file written by `metasolve train` (meta_solver.pt)")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    meta = MetaSolver.load(args.meta_solver)
    print(f"{'task':>6} {'zero guess':>12} {'predicted':>12} {'ms zero':>9} {'ms predicted':>13}")
    for index, task in enumerate(Poisson2D(32).eval_tasks(args.tasks)):
        A, b = task.petsc(PETSc.COMM_SELF)
        ksp = my_solver(A)
        x = A.createVecRight()
        begin = time.perf_counter()
        ksp.solve(b, x)
        zero_seconds, zero_iterations = time.perf_counter() - begin, ksp.getIterationNumber()

        begin = time.perf_counter()
        setting = meta.predict(task)          # includes the network's inference in the timing
        with MetaSolver.apply(setting, ksp, x):
            ksp.solve(b, x)
        seconds = time.perf_counter() - begin
        print(f"{index:>6} {zero_iterations:>12} {ksp.getIterationNumber():>12} "
              f"{1e3 * zero_seconds:>9.2f} {1e3 * seconds:>13.2f}")
        ksp.destroy()


if __name__ == "__main__":
    main()
