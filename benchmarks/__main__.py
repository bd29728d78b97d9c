"""`python -m benchmarks [--only SECTION ...] [--quick]` (`make bench`): the measured comparisons.

A repository command, apart from the `metasolve` package: the package never imports it.

One BLAS/OpenMP thread per process, set before numpy, torch or PETSc load (as the cluster job
script does): on this 2-core machine the threaded BLAS of numpy and torch otherwise spins beside
PETSc's single-threaded solve, which made a 2.6e5-unknown Newton solve 20% slower in wall time and
doubled its process CPU time (measured on `benchmarks.scale`'s Bratu solve).
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import sys  # noqa: E402

from benchmarks.run import SECTIONS, run_benchmarks  # noqa: E402

parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
parser.add_argument("--only", nargs="*", help=f"sections to run (default: all of {', '.join(SECTIONS)})")
parser.add_argument("--quick", action="store_true", help="tiny budgets, for smoke-testing the harness")
args = parser.parse_args()
try:
    run_benchmarks(only=args.only, quick=args.quick)
except ValueError as error:
    print(f"benchmarks: {error}", file=sys.stderr)
    sys.exit(2)
