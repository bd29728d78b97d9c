"""What a cost needs from a solve: where to stop (`Budget`), and how far a history got.

A training cost reads a residual history and needs it to run until a tolerance or an iteration
count (an early stop below which every later term is negligible, or a fixed k for a residual
after k iterations); an evaluation cost needs the tolerance reached. The cost states this once,
as a `Budget`, in its own terms — a tolerance relative to the task's reference norm (‖b‖, or
‖F(0)‖ for a nonlinear task), an absolute floor and an iteration count — and each oracle turns
it into its own options (`solvers.oracle.Oracle.budget_options`): `ksp_*` for a linear solve,
the Newton tolerances for a nonlinear one, the program's own prefix for a compiled program.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ROUND_OFF = 1e-8
"""Relative slack when judging whether a recorded norm met a tolerance: the solver compared its
own norm of b (or the program printed 13 digits), the cost recomputes it in another summation
order; the two agree to ~n·eps, far inside 1e-8 for any size a solve here has."""


@dataclass(frozen=True)
class Budget:
    """Stop when ‖r‖ ≤ max(rtol·reference, atol), or after `max_it` iterations.

    `reference` is the norm the costs divide by (`reference_norm(task)`), so a budget means the
    same accuracy whatever the initial guess (PETSc's KSP default test divides by ‖b‖, also for a
    nonzero guess; a Newton oracle turns `rtol` into an absolute tolerance per task). `rtol = 0`
    and `atol = 0` run exactly `max_it` iterations (a residual after k iterations).
    """

    rtol: float
    atol: float = 0.0
    max_it: int = 10_000

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Budget.{name} must be a finite number >= 0, got {value!r}")
        if not self.rtol < 1:
            raise ValueError(f"Budget.rtol must be < 1 (a relative tolerance), got {self.rtol!r}")
        if isinstance(self.max_it, bool) or not isinstance(self.max_it, (int, np.integer)) or self.max_it < 1:
            raise ValueError(f"Budget.max_it must be an integer >= 1, got {self.max_it!r}")
        object.__setattr__(self, "rtol", float(self.rtol))
        object.__setattr__(self, "atol", float(self.atol))
        object.__setattr__(self, "max_it", int(self.max_it))

    def threshold(self, reference: float) -> float:
        """The residual norm at which a solve under this budget stops."""
        return max(self.rtol * reference, self.atol)

    def reached(self, norm: float, reference: float) -> bool:
        """Whether a recorded residual norm meets the tolerance (up to `ROUND_OFF`)."""
        return bool(norm <= self.threshold(reference) * (1.0 + ROUND_OFF))


def linear_options(budget: Budget) -> dict[str, Any]:
    """The budget as PETSc KSP options (KSPConvergedDefault: ‖r‖ ≤ max(rtol·‖b‖, atol))."""
    return {"ksp_rtol": budget.rtol, "ksp_atol": budget.atol, "ksp_max_it": budget.max_it}


def newton_options(budget: Budget, reference: float) -> dict[str, Any]:
    """The budget as SNES options for a task whose reference norm is `reference`.

    SNES's own relative test divides by ‖F(u0)‖, which would demand more of a better guess; the
    budget's tolerance becomes the absolute `snes_atol = max(rtol·reference, atol)` instead, with
    `snes_rtol = 0`. The step tolerance stays the oracle's own: a solve it stops above the budget's
    tolerance is judged by the cost (`metasolve.method.cost`), not hidden.
    """
    return {"snes_rtol": 0.0, "snes_atol": budget.threshold(reference), "snes_max_it": budget.max_it}


def reference_norm(task: Any) -> float:
    """The norm a task's relative residuals divide by: `task.reference_norm` (a nonlinear task's
    ‖F(0)‖), else ‖b‖ of a linear task; a task with neither, or a zero one, is an error."""
    if hasattr(task, "reference_norm"):
        norm = float(task.reference_norm)
    elif hasattr(task, "b_array"):
        norm = float(np.linalg.norm(task.b_array()))
    else:
        raise ValueError(f"task {getattr(task, 'name', '') or type(task).__name__!r} has no reference norm "
                         "(neither reference_norm nor b): a relative tolerance is undefined for it")
    if not norm > 0:
        raise ValueError(f"task {getattr(task, 'name', '')!r} has a zero right-hand side: relative residuals are undefined")
    return norm


__all__ = ["Budget", "ROUND_OFF", "linear_options", "newton_options", "reference_norm"]
