"""metasolve: learn settings for black-box PETSc solvers through forward gradients.

The one idea: `BlackBox(oracle, space, cost, estimator)` is a torch operation whose forward pass
runs the real solver and whose backward pass estimates the gradient from extra forward solves.

The public names below load on first use, so that `metasolve predict` (which evaluates a
shipped model with numpy) starts without importing torch or PETSc.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlackBox": "metasolve.method.blackbox",
    "Choice": "metasolve.method.params", "Integer": "metasolve.method.params", "Interval": "metasolve.method.params",
    "LogInterval": "metasolve.method.params", "Space": "metasolve.method.params", "Vector": "metasolve.method.params",
    "IterationProxy": "metasolve.method.cost", "Iterations": "metasolve.method.cost", "LogResidual": "metasolve.method.cost",
    "ResidualArea": "metasolve.method.cost", "Work": "metasolve.method.cost",
    "SPSA": "metasolve.method.estimators", "ControlVariate": "metasolve.method.estimators",
    "Exact": "metasolve.method.estimators", "FiniteDifference": "metasolve.method.estimators",
    "ForwardGradient": "metasolve.method.estimators",
    "CostModel": "metasolve.method.score_function", "ScoreFunction": "metasolve.method.score_function",
    "Surrogate": "metasolve.method.surrogate",
    "MetaSolver": "metasolve.method.meta_solver",
    "Cost": "metasolve.method.protocols", "Executor": "metasolve.method.protocols", "Oracle": "metasolve.method.protocols",
    "MPIExecutor": "metasolve.training.parallel", "RemoteError": "metasolve.training.parallel",
    "SerialExecutor": "metasolve.training.parallel",
    "Trainer": "metasolve.training.train",
    "run": "metasolve.app.run", "load_config": "metasolve.app.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metasolve' has no attribute {name!r}")
    if _EXPORTS[name].startswith(("metasolve.method", "metasolve.training")):
        importlib.import_module("solvers._petsc")  # mpi4py.MPI before petsc4py, always
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
