"""Under mpiexec: `fn` raises on one rank only; every rank must raise RemoteError with its message.

Usage: error_on_one_rank.py GROUP_SIZE SCHEDULE OUT_DIR. Item 3 fails only on the last rank of
the worker that owns it (handed out as ranks free up: on whichever rank takes it). Each rank writes what it raised to OUT_DIR/rank<r>.txt (one file per rank, so the
test reads each rank's outcome whole, not two processes' stderr interleaved), then leaves the
RemoteError uncaught so the job exits non-zero.
"""
import sys
from pathlib import Path

from metasolve.training.parallel import MPIExecutor, RemoteError
from solvers._petsc import MPI

executor = MPIExecutor(MPI.COMM_WORLD, group_size=int(sys.argv[1]), schedule=sys.argv[2])
report = Path(sys.argv[3]) / f"rank{executor.rank}.txt"


def fail_on_item_3(item: int) -> int:
    if item == 3 and executor.rank % executor.group_size == executor.group_size - 1:
        raise ValueError("boom on item 3")
    return item


try:
    executor.map(fail_on_item_3, range(6))
except RemoteError as error:
    report.write_text(f"{type(error).__name__}: {error}\n")
    raise
report.write_text("map returned although item 3 failed\n")
