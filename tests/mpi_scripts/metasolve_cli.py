"""Under mpiexec: the `metasolve` command line, exactly as `mpiexec -n N metasolve ...` runs it."""
import sys

from metasolve.app.cli import main

sys.exit(main(sys.argv[1:]))
