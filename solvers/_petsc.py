"""The one place PETSc is imported.

`mpi4py.MPI` is imported first so that `libmpi` is already loaded when `libpetsc` (whose
RUNPATH may point at the venv that built it) is opened; `petsc4py.init` is called with no
command-line arguments so a user's script flags never reach the options database by accident.

`stage(name)` names a PETSc log stage, so `-log_view` splits a run's time and flops by what
metasolve was doing (oracle setup, solves, network, surrogate, communication).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mpi4py import MPI  # noqa: F401  (load order matters, see module docstring)

import petsc4py

petsc4py.init([])

from petsc4py import PETSc  # noqa: E402

_STAGES: dict[str, "PETSc.LogStage"] = {}


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


__all__ = ["MPI", "PETSc", "stage"]
