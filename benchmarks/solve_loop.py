"""Under mpiexec: every rank runs the same fixed PETSc solve loop and rank 0 prints the slowest
rank's wall time — the machine's own parallel capacity for this work, with no communication.

Timing of machinery: the oracle (one of the library's internals) in a bare loop; it trains nothing.
"""
import time

from problems import Poisson2D
from solvers import KSPOracle
from solvers._petsc import MPI

task = Poisson2D(48).eval_tasks(1)[0]
oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi", rtol=0, atol=0, max_it=300)
oracle(task)
MPI.COMM_WORLD.Barrier()
begin = time.perf_counter()
for _ in range(200):
    oracle(task)
slowest = MPI.COMM_WORLD.reduce(time.perf_counter() - begin, op=MPI.MAX)
if MPI.COMM_WORLD.Get_rank() == 0:
    print(slowest)
