"""`python -m benchmarks [--only SECTION ...] [--quick]` (`make bench`): the measured comparisons.

A repository command, apart from the `metasolve` package: the package never imports it."""
import argparse
import sys

from benchmarks.run import SECTIONS, run_benchmarks

parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
parser.add_argument("--only", nargs="*", help=f"sections to run (default: all of {', '.join(SECTIONS)})")
parser.add_argument("--quick", action="store_true", help="tiny budgets, for smoke-testing the harness")
args = parser.parse_args()
try:
    run_benchmarks(only=args.only, quick=args.quick)
except ValueError as error:
    print(f"benchmarks: {error}", file=sys.stderr)
    sys.exit(2)
