"""Under mpiexec: the options' supervised start spreads its per-task searches over the ranks and
ends with the same weights on every rank. Rank 0 prints one JSON line: per rank, the solves
counted and the fitted weights (as float hex strings, so equality is bitwise)."""
import json

from metasolve.training.parallel import MPIExecutor
from solvers._petsc import MPI
from tests.test_pretrain import supervised_start_weights

executor = MPIExecutor(MPI.COMM_WORLD)
weights, solves = supervised_start_weights(executor)
ranks = executor.allgather({"rank": executor.rank, "solves": solves, "weights": [float(w).hex() for w in weights]})
if executor.is_root:
    print(json.dumps(ranks), flush=True)
