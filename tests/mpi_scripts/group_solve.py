"""Under mpiexec: with group_size 2, each 2-D Poisson system (n=32) is solved by a group of 2 ranks.

The distributed CG+Jacobi solve must need the serial iteration count ±1 (the parallel dot
products sum in another order, which may move the stopping iteration by one). Exits non-zero on
every rank on a mismatch.
"""
import sys

from metasolve.training.parallel import MPIExecutor
from solvers import KSPOracle
from solvers._petsc import MPI
from tests.systems import poisson_2d

executor = MPIExecutor(MPI.COMM_WORLD, group_size=2)
seeds = [0, 1, 2]
oracle = KSPOracle("cg", "jacobi", rtol=1e-6, comm=executor.solve_comm)


def solve(seed):
    task = poisson_2d(32, seed)
    rows = task.petsc(executor.solve_comm)[0].getOwnershipRange()
    return oracle(task, {}), rows


gathered = executor.map(solve, seeds)
serial = [KSPOracle("cg", "jacobi", rtol=1e-6)(poisson_2d(32, seed), {}) for seed in seeds]
problems = []
if executor.solve_comm.getSize() != 2:
    problems.append(f"solve_comm has {executor.solve_comm.getSize()} ranks, expected 2")
for seed, (got, rows), want in zip(seeds, gathered, serial):
    if got.failed or abs(got.iterations - want.iterations) > 1:
        problems.append(f"seed {seed}: {got.iterations} iterations on the group vs {want.iterations} serial")
    if rows[1] - rows[0] == 32 * 32:
        problems.append(f"seed {seed}: the group leader owns every row {rows}: the solve was not distributed")

for problem in problems:
    print(f"rank {executor.rank}: {problem}", flush=True)
if MPI.COMM_WORLD.allreduce(len(problems)):
    sys.exit(1)
if executor.is_root:
    print(f"OK group solves on {executor.size} ranks: iterations {[o.iterations for o, _ in gathered]}, "
          f"serial {[o.iterations for o in serial]}")
