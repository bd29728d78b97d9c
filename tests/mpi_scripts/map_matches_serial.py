"""Under mpiexec: `MPIExecutor.map` returns the serial result on every rank, bit for bit.

Usage: map_matches_serial.py GROUP_SIZE. Checks even, uneven, single and empty item lists, and
that each rank ran exactly the block of items its worker owns (the work really was split).
Exits non-zero on every rank if any rank saw a mismatch.
"""
import sys

import numpy as np

from metasolve.parallel import MPIExecutor, SerialExecutor, block
from solvers._petsc import MPI


def value(item: int) -> tuple:
    """float64 values whose bits would expose any reordering or recomputation difference."""
    return item, np.random.default_rng(item).standard_normal(3), float(np.sin(item) / 7.0)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and np.array_equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


executor = MPIExecutor(MPI.COMM_WORLD, group_size=int(sys.argv[1]))
problems = []
for count in (0, 1, 5, 7, 2 * executor.size + 1):
    items = list(range(100, 100 + count))
    ran = []

    def recording_value(item: int) -> tuple:
        ran.append(item)
        return value(item)

    got = executor.map(recording_value, items)
    if not same(got, SerialExecutor().map(value, items)):
        problems.append(f"{count} items: result differs from the serial map")
    if not all(same(got, other) for other in MPI.COMM_WORLD.allgather(got)):
        problems.append(f"{count} items: ranks disagree")
    owned = [items[i] for i in block(count, executor.workers, executor.worker)]
    if ran != owned:
        problems.append(f"{count} items: ran {ran}, the block of worker {executor.worker} is {owned}")

for problem in problems:
    print(f"rank {executor.rank}: {problem}", flush=True)
if MPI.COMM_WORLD.allreduce(len(problems)):
    sys.exit(1)
if executor.is_root:
    print(f"OK map matches serial on {executor.size} ranks, group_size {executor.group_size}")
