"""Under mpiexec: each rank solves its own 1-D Poisson tasks on COMM_SELF; gathered Outcomes equal serial ones.

Equal means same iteration count, reason and bitwise-identical residual history: a task solved
on COMM_SELF by any rank runs the same floating-point operations as the serial solve.
"""
import sys

import numpy as np

from metasolve.training.parallel import MPIExecutor
from solvers import KSPOracle
from solvers._petsc import MPI, PETSc
from tests.systems import poisson_1d

executor = MPIExecutor(MPI.COMM_WORLD, schedule="static")  # a split decided ahead: every rank solves some
tasks = [poisson_1d(n, seed=n) for n in (16, 24, 32, 40, 48)]
oracle = KSPOracle("cg", "jacobi", rtol=1e-8, comm=executor.solve_comm)
solved_here = []


def solve(task):
    solved_here.append(task.name)
    return oracle(task, {})


gathered = executor.map(solve, tasks)
serial = [KSPOracle("cg", "jacobi", rtol=1e-8)(task, {}) for task in tasks]
problems = []
if executor.solve_comm.getSize() != 1 or executor.solve_comm != PETSc.COMM_SELF:
    problems.append("solve_comm is not PETSc.COMM_SELF")
for task, got, want in zip(tasks, gathered, serial):
    if got.failed or (got.iterations, got.reason) != (want.iterations, want.reason) \
            or not np.array_equal(got.residuals, want.residuals):
        problems.append(f"{task.name}: {got.iterations} iterations (reason {got.reason}) vs serial "
                        f"{want.iterations} (reason {want.reason})")
counts = MPI.COMM_WORLD.allgather(len(solved_here))
if sum(counts) != len(tasks) or min(counts) == 0:
    problems.append(f"tasks solved per rank {counts}: not a split of {len(tasks)} tasks over every rank")

for problem in problems:
    print(f"rank {executor.rank}: {problem}", flush=True)
if MPI.COMM_WORLD.allreduce(len(problems)):
    sys.exit(1)
if executor.is_root:
    print(f"OK per-rank KSP solves match serial; tasks per rank {counts}; "
          f"iterations {[o.iterations for o in gathered]}")
