"""The black boxes: real solvers behind one protocol, `oracle(task, setting) -> Outcome`."""
from solvers._petsc import PETSc  # noqa: F401  (imports mpi4py.MPI first)
from solvers.executable import ExecutableOracle
from solvers.isolated import IsolatedOracle
from solvers.ksp import KSPOracle
from solvers.linear_system import LinearSystem
from solvers.outcome import Outcome
from solvers.program_task import ArgumentFeatures, ProgramTask
from solvers.snes import SNESOracle
from solvers.twins import cg_residuals, jacobi_residuals, twin_for

__all__ = ["ArgumentFeatures", "ExecutableOracle", "IsolatedOracle", "KSPOracle", "LinearSystem", "Outcome", "ProgramTask", "SNESOracle", "cg_residuals", "jacobi_residuals", "twin_for"]
