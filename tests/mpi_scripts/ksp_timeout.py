"""Under mpiexec -n 2: one KSP solve distributed over both ranks that never converges, with a
timeout. Every rank must stop at the same iteration with the same "timed out" Outcome (a rank
that stopped alone would leave the others waiting in a collective forever), and the next
solve on the same communicator must work. Exits non-zero on every rank otherwise."""
import sys

from solvers import KSPOracle
from solvers._petsc import MPI, PETSc
from tests.systems import poisson_2d

comm = PETSc.COMM_WORLD
hung = KSPOracle("richardson", "jacobi", rtol=1e-12, max_it=2**31 - 1, options={"ksp_richardson_scale": 1e-9},
                 comm=comm, timeout=1.0)
outcome = hung(poisson_2d(16, seed=0), {})
after = KSPOracle("cg", "jacobi", rtol=1e-6, comm=comm, timeout=1.0)(poisson_2d(16, seed=0), {})
seen = MPI.COMM_WORLD.allgather((outcome.iterations, outcome.error, outcome.reason))
problems = []
if len(set(seen)) != 1:
    problems.append(f"the ranks ended differently: {seen}")
if not (outcome.failed and outcome.error and outcome.error.startswith("timed out after 1 s")):
    problems.append(f"not a timed-out Outcome: {outcome.error!r}, reason {outcome.reason}")
if not after.converged:
    problems.append(f"the next solve failed: {after.error!r}, reason {after.reason}")
for problem in problems:
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: {problem}", flush=True)
if MPI.COMM_WORLD.allreduce(len(problems)):
    sys.exit(1)
if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"OK both ranks timed out at iteration {outcome.iterations}")
