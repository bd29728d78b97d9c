"""Costs: an Outcome (and its task) → one float.

Training needs a cost that is smooth in θ. A tolerance-stopped iteration count is a step
function, so the training costs run a fixed iteration budget (`overrides` tell the oracle) and
read the residual history; `Iterations` is for evaluation only. A failed Outcome costs NaN in
training (the estimator drops it) and `failure_value` in reports.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from solvers.outcome import Outcome


def _rhs_norm(task: Any) -> float:
    norm = float(np.linalg.norm(task.b_array()))
    if not norm > 0:
        raise ValueError(f"task {getattr(task, 'name', '')!r} has a zero right-hand side: relative residuals are undefined")
    return norm


class LogResidual:
    """log10(‖r_k‖/‖b‖) after exactly k iterations (no tolerance stop, so it is smooth in θ)."""

    def __init__(self, iterations: int) -> None:
        if iterations < 1:
            raise ValueError(f"LogResidual needs iterations >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.overrides = {"ksp_max_it": self.iterations, "ksp_rtol": 0.0, "ksp_atol": 0.0}

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if outcome.failed:
            return math.nan
        final = max(float(outcome.residuals[-1]), 1e-300)
        return math.log10(final / _rhs_norm(task))

    def failure_value(self, task: Any) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"LogResidual({self.iterations})"


class IterationProxy:
    """NI-GBMS's smoothed iteration count: Σ_i sigmoid(sharpness·(log10(‖r_i‖/‖b‖) − log10 rtol)).

    Each iterate still above the tolerance counts ≈1 and each below ≈0, so the sum tracks the
    iteration count while staying differentiable in the residuals.
    """

    def __init__(self, rtol: float, max_it: int = 100, sharpness: float = 4.0) -> None:
        if not 0 < rtol < 1:
            raise ValueError(f"IterationProxy needs 0 < rtol < 1, got {rtol}")
        if max_it < 1 or not sharpness > 0:
            raise ValueError(f"IterationProxy needs max_it >= 1 and sharpness > 0, got {max_it}, {sharpness}")
        self.rtol, self.max_it, self.sharpness = float(rtol), int(max_it), float(sharpness)
        self.overrides = {"ksp_max_it": self.max_it, "ksp_rtol": 0.0, "ksp_atol": 0.0}

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if outcome.failed:
            return math.nan
        relative = np.maximum(outcome.residuals, 1e-300) / _rhs_norm(task)
        excess = self.sharpness * (np.log10(relative) - math.log10(self.rtol))
        return float(np.sum(0.5 * (1.0 + np.tanh(0.5 * excess))))

    def failure_value(self, task: Any) -> float:
        return float(self.max_it + 1)

    def __repr__(self) -> str:
        return f"IterationProxy({self.rtol}, max_it={self.max_it}, sharpness={self.sharpness})"


class Iterations:
    """Iterations to reach ‖r‖ ≤ rtol·‖b‖ (evaluation only: a step function of θ)."""

    def __init__(self, rtol: float = 1e-6, max_it: int = 10_000) -> None:
        if not 0 < rtol < 1 or max_it < 1:
            raise ValueError(f"Iterations needs 0 < rtol < 1 and max_it >= 1, got {rtol}, {max_it}")
        self.rtol, self.max_it = float(rtol), int(max_it)
        self.overrides = {"ksp_rtol": self.rtol, "ksp_max_it": self.max_it}

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if outcome.failed or not outcome.converged:
            return math.nan
        return float(outcome.iterations)

    def failure_value(self, task: Any) -> float:
        return float(self.max_it)

    def __repr__(self) -> str:
        return f"Iterations({self.rtol}, max_it={self.max_it})"
