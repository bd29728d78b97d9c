"""metasolve: learn settings for black-box PETSc solvers through forward gradients.

The one idea: `BlackBox(oracle, space, cost, estimator)` is a torch operation whose forward pass
runs the real solver and whose backward pass estimates the gradient from extra forward solves.
"""
from solvers._petsc import PETSc  # noqa: F401  (mpi4py.MPI before petsc4py, always)

from metasolve.blackbox import BlackBox
from metasolve.cost import IterationProxy, Iterations, LogResidual, ResidualArea, Work
from metasolve.estimators import SPSA, ControlVariate, Exact, FiniteDifference, ForwardGradient
from metasolve.meta_solver import MetaSolver
from metasolve.parallel import MPIExecutor, RemoteError, SerialExecutor
from metasolve.protocols import Cost, Executor, Oracle
from metasolve.params import Choice, Integer, Interval, LogInterval, Space, Vector
from metasolve.score_function import CostModel, ScoreFunction
from metasolve.surrogate import Surrogate
from metasolve.train import Trainer

__all__ = [
    "Cost", "Executor", "Oracle",
    "BlackBox", "Choice", "ControlVariate", "Exact", "FiniteDifference", "ForwardGradient", "Integer", "Interval",
    "IterationProxy", "Iterations", "ResidualArea", "Work", "LogInterval", "LogResidual", "MPIExecutor", "MetaSolver", "RemoteError",
    "SPSA", "ScoreFunction", "CostModel", "SerialExecutor", "Space", "Surrogate", "Trainer", "Vector",
]
