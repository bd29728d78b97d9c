"""Costs: an Outcome (and its task) → one float.

Training needs a cost that is smooth in θ. A tolerance-stopped iteration count is a step
function, so the training costs read the residual history (`budget`, a `solvers.budget.Budget`,
tells the oracle where it may stop: `oracle.solve_within(cost.budget, task, settings)`);
`Iterations` is for evaluation only. A failed Outcome costs NaN in training (the estimator drops
it) and `failure_value` in reports.

Costs check what they count. A history that stops above the cost's tolerance without having
used the budget's `max_it` — a program that kept its own looser `-ksp_rtol` (‖r‖/‖b‖ = 9.6e-6 for
`Iterations(1e-6)`), or Richardson + SOR reporting CONVERGED_ITS after sweeps with no test — is
charged as a failure (NaN in training, `failure_value` in reports), not scored, and logged once
per cost with the likely cause. Not scored, because its value is biased low exactly where it is
wrong: a truncated history has a smaller area and fewer iterations, so training would *reward*
whatever makes the solver stop early. Not charged the budget-exhaustion value either, because
that is a number the solve never showed: the setting may be excellent and the budget simply not
have reached the solver — a mistake of the set-up, which a failure makes visible (counted, and
the trainer's fail-fast stops a run in which every centre fails). A history that used the whole
budget is genuine data for the smooth costs (truncated by the cost's own choice) and a failure
for the tolerance costs (`Iterations`, `LogWorkToTolerance`), as before. Residual norms are
compared with the tolerance where the cost's norm is the solver's (the unpreconditioned norm over
‖b‖, a Newton residual over the task's reference norm, a program's printed ‖r‖/‖b‖); for other
norms only PETSc's reason is judged (CONVERGED_ITS is no tolerance reached).

Which training cost. Iterations to a tolerance are set by the slowest error component, so a cost
must see every slow component for as long as it is above the tolerance: `LogResidual(k)` sees
only iteration k, `IterationProxy` only the iterates near the tolerance crossing, `ResidualArea`
every iterate until far below the tolerance, and keeps a gradient when the budget truncates the
solve. Measured on NI-GBMS's Poisson1D (Richardson + Jacobi 0.9, x0 in 8 sine modes; zero guess
1530 mean iterations, exact 8-mode projection 58): with *exact* gradients through a damped-Jacobi
twin from a zero-initialised linear map (100 steps, Adam 1e-2) no cost learns much — ResidualArea
1495, IterationProxy 1457, mean log residual over 300 iterations 1298, LogResidual(20) 1254 —
which is why initial guesses are pretrained on solutions first (`metasolve.training.pretrain`, 99.5).
From there, 400 steps through PETSc at the capped learning rate: IterationProxy 95, ResidualArea
105, LogResidual(20) unchanged (99.5). The differences after pretraining are within ±6%;
`ResidualArea` is the default because it is the one that still has a gradient in every slow mode
when a setting misses the tolerance within the budget.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc
from solvers.budget import ROUND_OFF, Budget, linear_options, reference_norm
from solvers.monitor_parser import LinearSolve, NonlinearSolve
from solvers.outcome import Outcome

logger = logging.getLogger(__name__)

_CHECKED_NORMS = ("unpreconditioned", "function")
"""Norm types whose recorded history is the norm the costs divide by the reference."""
KSP_CONVERGED_ITS = int(PETSc.KSP.ConvergedReason.CONVERGED_ITS)
"""Stopped after max_it with no test (Richardson's fast path): a reason > 0 that is no tolerance reached."""


def linear_solves(solves: Sequence[Any]) -> list[LinearSolve]:
    """The linear solves of a run in print order, those inside Newton steps included."""
    return [linear for solve in solves
            for linear in ((solve,) if isinstance(solve, LinearSolve) else
                           solve.linear if isinstance(solve, NonlinearSolve) else ())]


def _solve_short(relative: float, norm: float, iterations: int, reason: int, budget: Budget, exhausted_ok: bool,
                 checkable: bool) -> str | None:
    """Why one history stops short of `budget` (None if it does not)."""
    if exhausted_ok and iterations >= budget.max_it:
        return None
    if checkable:
        if relative <= budget.rtol * (1.0 + ROUND_OFF) or norm <= budget.atol * (1.0 + ROUND_OFF):
            return None
        return (f"it stopped at a relative residual of {relative:.3g} > {budget.rtol:.3g} after {iterations} "
                f"iteration(s) (reason {reason})")
    if reason == KSP_CONVERGED_ITS:
        return f"it reported CONVERGED_ITS after {iterations} iteration(s), no tolerance tested"
    return None


def stopped_short(outcome: Outcome, task: Any, budget: Budget, exhausted_ok: bool,
                  solves: Sequence[LinearSolve] | None = None) -> str | None:
    """Why `outcome` stopped above `budget`'s tolerance without being allowed to (None: it did not).

    `exhausted_ok`: a history that used all `budget.max_it` iterations counts as complete (the
    smooth training costs); otherwise only the tolerance does (evaluation costs). A program run is
    judged solve by solve on the ratio it printed (`solves`, default every linear solve of the run).
    """
    if outcome.solves and outcome.norm_type != "function":
        for solve in linear_solves(outcome.solves) if solves is None else solves:
            if not len(solve.relative):
                continue
            why = _solve_short(float(solve.relative[-1]), float(solve.residuals[-1]), solve.iterations, solve.reason,
                               budget, exhausted_ok, checkable=True)
            if why is not None:
                return f"a {solve.prefix or 'linear'} solve of the run: {why}"
        return None
    if outcome.solves or not len(outcome.residuals):
        return None
    checkable = outcome.norm_type in _CHECKED_NORMS
    final = float(outcome.residuals[-1])
    relative = final / reference_norm(task) if checkable else math.nan
    return _solve_short(relative, final, outcome.iterations, outcome.reason, budget, exhausted_ok, checkable)


class BudgetedCost:
    """What every cost here shares: its `budget` (None: the solver's own stopping test), the
    derived `overrides`, and the check that a solve respected the budget (module docstring)."""

    budget: Budget | None = None
    exhausted_ok = True
    """Whether a history that used all `budget.max_it` iterations is complete data for this cost."""
    _warned = False

    @property
    def overrides(self) -> dict[str, Any]:
        """The budget as KSP option names (`ksp_rtol`, `ksp_atol`, `ksp_max_it`); read-only, kept
        for callers that merge it into settings. New code: `oracle.solve_within(cost.budget, ...)`,
        which maps the budget to each oracle's own options."""
        return {} if self.budget is None else linear_options(self.budget)

    def usable(self, outcome: Outcome, task: Any, solves: Sequence[LinearSolve] | None = None) -> bool:
        """Not failed, and stopped where the budget allows (else logged once per cost, with the cause)."""
        if outcome.failed:
            return False
        if self.budget is None:
            return True
        why = stopped_short(outcome, task, self.budget, self.exhausted_ok, solves)
        if why is None:
            return True
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        logger.log(level, "%r charged a failure on task %r: %s, above the cost's tolerance with budget left. The "
                   "solver did not stop where the cost needs: pass the budget (oracle.solve_within(cost.budget, ...)), "
                   "check the program's own -ksp_rtol, and give Richardson + SOR a monitor.",
                   self, getattr(task, "name", ""), why)
        return False


class LogResidual(BudgetedCost):
    """log10(‖r_k‖/‖b‖) after exactly k iterations (no tolerance stop, so it is smooth in θ)."""

    def __init__(self, iterations: int) -> None:
        if iterations < 1:
            raise ValueError(f"LogResidual needs iterations >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.budget = Budget(rtol=0.0, atol=0.0, max_it=self.iterations)

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not self.usable(outcome, task):
            return math.nan
        final = max(float(outcome.residuals[-1]), 1e-300)
        return math.log10(final / reference_norm(task))

    def failure_value(self, task: Any) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"LogResidual({self.iterations})"


def stop_decades(sharpness: float) -> float:
    """How far below the tolerance a sigmoid-counted iterate adds < 1e-3: sigmoid(−sharpness·d)
    < 1e-3 for d > ln(999)/sharpness decades (1.7 at sharpness 4); never less than two decades."""
    return max(2.0, math.log(999.0) / sharpness)


class IterationProxy(BudgetedCost):
    """NI-GBMS's smoothed iteration count: Σ_i sigmoid(sharpness·(log10(‖r_i‖/‖b‖) − log10 rtol)).

    Each iterate still above the tolerance counts ≈1 and each below ≈0, so the sum tracks the
    iteration count while staying differentiable in the residuals. The solve stops once the
    residual is `stop_decades(sharpness)` below the tolerance, where every later term is < 1e-3
    and keeps falling geometrically, instead of running all `max_it` iterations.
    """

    def __init__(self, rtol: float, max_it: int = 100, sharpness: float = 4.0) -> None:
        if not 0 < rtol < 1:
            raise ValueError(f"IterationProxy needs 0 < rtol < 1, got {rtol}")
        if max_it < 1 or not sharpness > 0:
            raise ValueError(f"IterationProxy needs max_it >= 1 and sharpness > 0, got {max_it}, {sharpness}")
        self.rtol, self.max_it, self.sharpness = float(rtol), int(max_it), float(sharpness)
        stop = self.rtol * 10.0 ** -stop_decades(self.sharpness)
        self.budget = Budget(rtol=stop, atol=0.0, max_it=self.max_it)

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not self.usable(outcome, task):
            return math.nan
        return smoothed_iterations(outcome.residuals / reference_norm(task), self.rtol, self.sharpness)

    def failure_value(self, task: Any) -> float:
        return float(self.max_it + 1)

    def __repr__(self) -> str:
        return f"IterationProxy({self.rtol}, max_it={self.max_it}, sharpness={self.sharpness})"


def smoothed_iterations(relative: np.ndarray, rtol: float, sharpness: float) -> float:
    """Σ_i sigmoid(sharpness·(log10 relative_i − log10 rtol)) ≈ iterations to `rtol`."""
    excess = sharpness * (np.log10(np.maximum(relative, 1e-300)) - math.log10(rtol))
    return float(np.sum(0.5 * (1.0 + np.tanh(0.5 * excess))))


class ResidualArea(BudgetedCost):
    """Area between the log-residual curve and a floor `decades` below the tolerance, in iterations.

    A(θ) = ∫ log10 max(‖r(i)‖/(f·‖b‖), 1) di (trapezoidal rule over the iterations i),
    f = rtol·10^(−decades), reported as 2A/D with D = −log10 f: the iteration count of a
    straight log-residual line from ‖b‖ to the floor with the same area (a cost of 60 reads as
    "about 60 iterations"; a guess already below the floor costs 0).

    Why this shape. An error component decaying as a·ρ^i contributes to the residual until it
    falls below the floor, log(a/f)/|log ρ| iterations, over which it adds ≈ log10(a/f)²/(2|log10 ρ|)
    to A: every component counts as long as it is alive, weighted by how slowly it dies, so the
    gradient reaches each slow component — unlike the residual at one iteration k (blind to what
    is still slow after k) or a sigmoid count of the iterates near the tolerance (it moves one
    mode at a time). Iterations to the tolerance, the user's goal, are the same curve read at one
    height, so lowering the curve everywhere lowers them. The terms are continuous in the
    residuals (max(·, 1) is 1 exactly where a term reaches zero), and every term below the floor
    is exactly zero, so the solve stops there (`ksp_rtol = f`) instead of running `max_it`: the
    value is the same as with the full budget for a monotone residual.
    """

    def __init__(self, rtol: float, max_it: int = 1000, decades: float = 2.0, stop: bool = True) -> None:
        """`stop=False` leaves the oracle's own stopping test alone (e.g. a Newton solve that
        converges in a few steps anyway; `budget` is None and nothing is checked); the floor then
        only shapes the value."""
        if not 0 < rtol < 1:
            raise ValueError(f"ResidualArea needs 0 < rtol < 1, got {rtol}")
        if max_it < 1 or not decades >= 0:
            raise ValueError(f"ResidualArea needs max_it >= 1 and decades >= 0, got {max_it}, {decades}")
        self.rtol, self.max_it, self.decades = float(rtol), int(max_it), float(decades)
        self.floor = self.rtol * 10.0 ** -self.decades
        self.budget = Budget(rtol=self.floor, atol=0.0, max_it=self.max_it) if stop else None

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not self.usable(outcome, task):
            return math.nan
        return self.area(outcome.residuals / reference_norm(task))

    def area(self, relative: np.ndarray) -> float:
        """2A/D for a history of relative residuals ‖r_i‖/‖b‖."""
        above = np.log10(np.maximum(np.asarray(relative, dtype=np.float64), 1e-300) / self.floor)
        heights = np.maximum(above, 0.0)
        area = float(np.sum(heights) - 0.5 * (heights[0] + heights[-1]))
        return 2.0 * area / -math.log10(self.floor)

    def failure_value(self, task: Any) -> float:
        return float(2 * (self.max_it + 1))

    def __repr__(self) -> str:
        return f"ResidualArea({self.rtol}, max_it={self.max_it}, decades={self.decades})"


class Work(BudgetedCost):
    """Megaflops of setup + solve to the tolerance, from PETSc's own flop counter: deterministic,
    so settings that trade setup against iterations (GAMG threshold, ILU fill, Chebyshev bounds)
    are compared without timing noise.

    Smooth for training: setup flops + (solve flops per iteration) × the sigmoid-smoothed
    iteration count of `IterationProxy` (same early stop), so a setting that saves part of an
    iteration's worth of residual already moves the cost. Needs an oracle that counts flops
    (`KSPOracle` does; `Outcome.flops`/`setup_flops`).
    """

    def __init__(self, rtol: float, max_it: int = 10_000, sharpness: float = 4.0) -> None:
        self.proxy = IterationProxy(rtol, max_it=max_it, sharpness=sharpness)
        self.budget = self.proxy.budget

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not self.usable(outcome, task):
            return math.nan
        if outcome.flops <= 0 and outcome.iterations > 0:
            raise ValueError("Work cost: the oracle reported no flop count (Outcome.flops = 0 after "
                             f"{outcome.iterations} iterations); use an oracle that counts flops, e.g. KSPOracle")
        per_iteration = outcome.flops / max(outcome.iterations, 1)
        return 1e-6 * (outcome.setup_flops + per_iteration * self.proxy(outcome, task))

    def failure_value(self, task: Any) -> float:
        return math.inf

    def __repr__(self) -> str:
        p = self.proxy
        return f"Work({p.rtol}, max_it={p.max_it}, sharpness={p.sharpness})"


class LogWorkToTolerance(BudgetedCost):
    """log10 of the work to reach ‖r‖ ≤ rtol·‖b‖: setup + solve flops (PETSc's counter) or seconds.

    For discrete settings (which Krylov method, which preconditioner, a GMRES restart), learned
    with the score function: it needs no smoothness in θ, only a cost per sampled choice, so it
    can be the user's own goal — work to the tolerance — rather than a smooth proxy. Log scale
    because configurations differ by orders of magnitude and tasks by size: a policy gradient
    then weighs a 2× saving alike on every task. A solve that did not converge within `max_it`
    is a failure (NaN): the score-function estimator charges it above the worst working choice.
    """

    def __init__(self, rtol: float = 1e-8, max_it: int = 2000, measure: str = "flops") -> None:
        if not 0 < rtol < 1 or max_it < 1:
            raise ValueError(f"LogWorkToTolerance needs 0 < rtol < 1 and max_it >= 1, got {rtol}, {max_it}")
        if measure not in ("flops", "seconds"):
            raise ValueError(f"LogWorkToTolerance measure must be 'flops' or 'seconds', got {measure!r}")
        self.rtol, self.max_it, self.measure = float(rtol), int(max_it), measure
        self.budget = Budget(rtol=self.rtol, atol=0.0, max_it=self.max_it)

    exhausted_ok = False

    def work(self, outcome: Outcome) -> float:
        if self.measure == "flops":
            return outcome.setup_flops + outcome.flops
        return outcome.setup_seconds + outcome.seconds

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not outcome.converged or not self.usable(outcome, task):
            return math.nan
        return math.log10(max(self.work(outcome), 1e-300))

    def failure_value(self, task: Any) -> float:
        return math.inf

    def __repr__(self) -> str:
        return f"LogWorkToTolerance({self.rtol}, max_it={self.max_it}, measure={self.measure!r})"


class Iterations(BudgetedCost):
    """Iterations to reach ‖r‖ ≤ rtol·‖b‖ (evaluation only: a step function of θ)."""

    def __init__(self, rtol: float = 1e-6, max_it: int = 10_000) -> None:
        if not 0 < rtol < 1 or max_it < 1:
            raise ValueError(f"Iterations needs 0 < rtol < 1 and max_it >= 1, got {rtol}, {max_it}")
        self.rtol, self.max_it = float(rtol), int(max_it)
        self.budget = Budget(rtol=self.rtol, atol=0.0, max_it=self.max_it)

    exhausted_ok = False

    def __call__(self, outcome: Outcome, task: Any) -> float:
        if not outcome.converged or not self.usable(outcome, task):
            return math.nan
        return float(outcome.iterations)

    def failure_value(self, task: Any) -> float:
        return float(self.max_it)

    def __repr__(self) -> str:
        return f"Iterations({self.rtol}, max_it={self.max_it})"
