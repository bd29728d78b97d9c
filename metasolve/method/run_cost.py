"""The training cost of a whole program run: every linear solve counted, each against its own b.

A time-stepping code solves once per step, starting each solve from the previous step's
solution. PETSc's default test stops a solve at ‖r_i‖ ≤ rtol·‖b‖ — with a nonzero initial guess
too (KSPConvergedDefault takes ‖b‖, not ‖r_0‖, unless told otherwise) — and
`-ksp_monitor_true_residual` prints exactly that ratio as its last column. The run's cost is the
total iteration count, a step function of the settings, so training uses NI-GBMS's smoothed
count summed over the solves:

    C = Σ_solves Σ_i σ(s·(log10(‖r_i‖/‖b‖) − log10 rtol)),   σ(z) = 1/(1 + e^(−z)),

which tracks Σ_solves iterations-to-rtol (each iterate above the tolerance counts ≈ 1, each below
≈ 0) while moving smoothly with the residuals. Reading each solve's ‖b‖ from the program's own
output, not from a task, is what makes it work for a task that is only program arguments (no b
in hand) and for solves whose right-hand sides differ in size. Iterates more than
max(2, ln(999)/s) decades below the tolerance add < 1e-3 each, so the solves may stop there
instead of at `max_it` (the cost's `budget`, which reaches the program as `-<prefix>ksp_*`).

A counted solve that stopped above that point with iterations left (the program kept its own
`-ksp_rtol`, or Richardson + SOR ran without a monitor and reported CONVERGED_ITS) would be
counted short: the run is charged as a failure instead (`metasolve.method.cost`, module docstring).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from metasolve.method.cost import BudgetedCost, linear_solves, stop_decades
from solvers.budget import Budget
from solvers.monitor_parser import LinearSolve
from solvers.outcome import Outcome


class RunIterationProxy(BudgetedCost):
    """Smoothed total linear iterations of a run (`Outcome.solves` of an `ExecutableOracle`).

    `prefix` restricts the sum to the solves of one solver (None: every linear solve, those inside
    Newton steps included).
    """

    def __init__(self, rtol: float, max_it: int = 1000, sharpness: float = 4.0, prefix: str | None = None) -> None:
        if not 0 < rtol < 1:
            raise ValueError(f"RunIterationProxy needs 0 < rtol < 1, got {rtol}")
        if max_it < 1 or not sharpness > 0:
            raise ValueError(f"RunIterationProxy needs max_it >= 1 and sharpness > 0, got {max_it}, {sharpness}")
        self.rtol, self.max_it, self.sharpness, self.prefix = float(rtol), int(max_it), float(sharpness), prefix
        stop = self.rtol * 10.0 ** -stop_decades(self.sharpness)
        self.budget = Budget(rtol=stop, atol=0.0, max_it=self.max_it)

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if outcome.failed:
            return math.nan
        solves = self._linear(outcome.solves)
        if not solves:
            raise ValueError("RunIterationProxy needs an Outcome with solves (an ExecutableOracle run); got none")
        if not self.usable(outcome, task, solves):
            return math.nan
        relative = np.concatenate([s.relative for s in solves])
        excess = self.sharpness * (np.log10(np.maximum(relative, 1e-300)) - math.log10(self.rtol))
        return float(np.sum(0.5 * (1.0 + np.tanh(0.5 * excess))))

    def _linear(self, solves: list) -> list[LinearSolve]:
        return [s for s in linear_solves(solves) if self.prefix is None or s.prefix == self.prefix]

    def failure_value(self, task: Any) -> float:
        return float(self.max_it + 1)

    def __repr__(self) -> str:
        return f"RunIterationProxy({self.rtol}, max_it={self.max_it}, sharpness={self.sharpness}, prefix={self.prefix!r})"
