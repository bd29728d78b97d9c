"""The one place PETSc is imported.

`mpi4py.MPI` is imported first so that `libmpi` is already loaded when `libpetsc` (whose
RUNPATH may point at the venv that built it) is opened; `petsc4py.init` is called with no
command-line arguments so a user's script flags never reach the options database by accident; a
program that means to pass PETSc options (the `metasolve` command, after `--`) calls
`insert_options`.

`stage(name)` names a PETSc log stage, so `-log_view` splits a run's time and flops by what
metasolve was doing (oracle setup, solves, network, surrogate, communication).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from mpi4py import MPI  # noqa: F401  (load order matters, see module docstring)

import petsc4py

petsc4py.init([])

from petsc4py import PETSc  # noqa: E402

_STAGES: dict[str, "PETSc.LogStage"] = {}


def insert_options(args: Sequence[str]) -> None:
    """Take PETSc options from a program's command line (`metasolve train run.toml -- -log_view`).

    PETSc is already initialised when a program's arguments are parsed, so they are inserted
    as `PetscOptionsInsertString` does for any string (which also reads `-options_file NAME`).
    Two options act at initialisation and are honoured here instead: `-log_view` (and the other
    `-log_*` viewers) need PETSc's default log handler, started now, and `-help` prints PETSc's
    help for each object when its `setFromOptions` runs.
    """
    if not args:
        return
    PETSc.Options().insertString(" ".join(args))  # PETSc splits on blanks, as it does argv
    if any(a.startswith(("-log_view", "-log_summary", "-log_all", "-log_trace")) for a in args):
        PETSc.Log.begin()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Run the block inside the PETSc log stage `name` (registered once, then reused)."""
    if name not in _STAGES:
        _STAGES[name] = PETSc.Log.Stage(name)
    log_stage = _STAGES[name]
    log_stage.push()
    try:
        yield
    finally:
        log_stage.pop()


__all__ = ["MPI", "PETSc", "insert_options", "stage"]
