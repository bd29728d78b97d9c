"""Under mpiexec: rank 1 raises outside `map` while rank 0 waits in it.

With `abort_on_uncaught_exception` installed the job must end at once with a non-zero code;
without it rank 0 would wait in the all-gather forever.
"""
from metasolve.training.parallel import MPIExecutor, abort_on_uncaught_exception
from solvers._petsc import MPI

abort_on_uncaught_exception()
executor = MPIExecutor(MPI.COMM_WORLD)
if executor.rank == 1:
    raise RuntimeError("rank 1 fails outside map")
executor.map(abs, range(4))
