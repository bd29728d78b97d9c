"""`python -m metasolve ...` is the `metasolve` command."""
import sys

from metasolve.app.cli import main

sys.exit(main())
