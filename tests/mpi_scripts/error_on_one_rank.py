"""Under mpiexec: `fn` raises on one rank only; every rank must raise RemoteError with its message.

Usage: error_on_one_rank.py GROUP_SIZE. Item 3 fails only on the last rank of the worker that owns
it. The RemoteError is left uncaught so the test sees one traceback per rank and a non-zero exit.
"""
import sys

from metasolve.parallel import MPIExecutor
from solvers._petsc import MPI

executor = MPIExecutor(MPI.COMM_WORLD, group_size=int(sys.argv[1]))


def fail_on_item_3(item: int) -> int:
    if item == 3 and executor.rank % executor.group_size == executor.group_size - 1:
        raise ValueError("boom on item 3")
    return item


executor.map(fail_on_item_3, range(6))
print(f"rank {executor.rank}: map returned although item 3 failed", flush=True)
