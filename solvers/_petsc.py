"""The one place PETSc is imported.

`mpi4py.MPI` is imported first so that `libmpi` is already loaded when `libpetsc` (whose
RUNPATH may point at the venv that built it) is opened; `petsc4py.init` is called with no
command-line arguments so a user's script flags never reach the options database by accident.
"""
from __future__ import annotations

from mpi4py import MPI  # noqa: F401  (load order matters, see module docstring)

import petsc4py

petsc4py.init([])

from petsc4py import PETSc  # noqa: E402

__all__ = ["MPI", "PETSc"]
