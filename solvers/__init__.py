"""The black boxes: real solvers behind one base class, `Oracle` — `oracle(task, setting) -> Outcome`."""
from solvers._petsc import PETSc  # noqa: F401  (imports mpi4py.MPI first)
from solvers.budget import Budget
from solvers.dmda_snes import DMDAProblem, DMDASNESOracle
from solvers.executable import ExecutableOracle
from solvers.isolated import IsolatedOracle
from solvers.ksp import KSPOracle
from solvers.linear_system import LinearSystem
from solvers.oracle import Oracle
from solvers.outcome import Outcome
from solvers.program_task import ArgumentFeatures, ProgramTask
from solvers.snes import SNESOracle
from solvers.twins import cg_residuals, jacobi_residuals, twin_for

__all__ = ["ArgumentFeatures", "Budget", "DMDAProblem", "DMDASNESOracle", "ExecutableOracle", "IsolatedOracle",
           "KSPOracle", "LinearSystem", "Oracle", "Outcome", "ProgramTask", "SNESOracle", "cg_residuals",
           "jacobi_residuals", "twin_for"]
