"""The black boxes: real solvers behind one base class, `Oracle` — `oracle(task, setting) -> Outcome`.

The names below load on first use: `solvers.text` (option and argument text) serves the
torch- and PETSc-free deployment path, which must not pay for importing PETSc."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Budget": "solvers.budget", "DMDAProblem": "solvers.dmda_snes", "DMDASNESOracle": "solvers.dmda_snes",
    "ExecutableOracle": "solvers.executable", "IsolatedOracle": "solvers.isolated", "KSPOracle": "solvers.ksp",
    "LinearSystem": "solvers.linear_system", "Oracle": "solvers.oracle", "Outcome": "solvers.outcome",
    "ArgumentFeatures": "solvers.program_task", "ProgramTask": "solvers.program_task", "SNESOracle": "solvers.snes",
    "cg_residuals": "solvers.twins", "jacobi_residuals": "solvers.twins", "twin_for": "solvers.twins",
    "PETSc": "solvers._petsc",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'solvers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
