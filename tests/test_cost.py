"""Training and evaluation costs on analytic residual histories, and on real PETSc solves."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from metasolve.method.cost import (IterationProxy, Iterations, LogResidual, LogWorkToTolerance, ResidualArea, Work,
                                   smoothed_iterations, stop_decades)
from problems import Poisson1D
from solvers import Budget, KSPOracle, LinearSystem
from solvers.outcome import Outcome


def _outcome(relative: np.ndarray, **fields) -> Outcome:
    fields = {"reason": 2, "converged": True, **fields}
    return Outcome(residuals=2.0 * np.asarray(relative, dtype=np.float64), iterations=len(relative) - 1,
                   seconds=0.0, **fields)


TASK = LinearSystem(sp.identity(4, format="csr"), np.array([2.0, 0.0, 0.0, 0.0]))  # ‖b‖ = 2


def test_residual_area_of_a_straight_line_is_its_iteration_count():
    """‖r_i‖/‖b‖ = 10^(−i): D = 8 decades to the floor 1e-8 in 8 iterations, area 8·8/2 → 8."""
    cost = ResidualArea(1e-6, decades=2)
    assert cost.overrides == {"ksp_max_it": 1000, "ksp_rtol": pytest.approx(1e-8), "ksp_atol": 0.0}
    assert cost(_outcome(10.0 ** -np.arange(11)), TASK) == pytest.approx(8.0, rel=1e-12)
    # Half the slope: 16 iterations. Starting two decades down: the last 6 decades in 6 iterations,
    # area 6·6/2 = 18 decade-iterations, 2·18/8 = 4.5.
    assert cost(_outcome(10.0 ** (-np.arange(21) / 2)), TASK) == pytest.approx(16.0, rel=1e-12)
    assert cost(_outcome(10.0 ** -np.arange(2, 11)), TASK) == pytest.approx(4.5, rel=1e-12)
    # A guess already below the floor costs nothing; a failed solve is NaN (dropped in training).
    assert cost(_outcome([1e-9, 1e-10]), TASK) == 0.0
    assert math.isnan(cost(Outcome.failure("boom"), TASK))


def test_residual_area_sees_a_slow_component_that_log_residual_at_k_misses():
    """Two histories equal at iteration 10 but one with a slow tail after it: only the area differs."""
    fast = np.concatenate([10.0 ** -np.arange(11), [1e-13]])  # both run to the floor, as the budget makes them
    slow = np.concatenate([10.0 ** -np.arange(11), 1e-10 * 0.9 ** np.arange(1, 60)])
    at_ten = LogResidual(10)
    assert at_ten(_outcome(slow[:11]), TASK) == at_ten(_outcome(fast[:11]), TASK)
    cost = ResidualArea(1e-10, decades=2)  # floor 1e-12: the tail lives 43 iterations above it
    assert cost(_outcome(slow), TASK) > cost(_outcome(fast), TASK) + 5


def test_iteration_proxy_stops_where_the_remaining_terms_cannot_matter():
    assert stop_decades(4.0) == 2.0 and stop_decades(2.0) == pytest.approx(math.log(999) / 2.0)
    cost = IterationProxy(1e-3, max_it=500, sharpness=4.0)
    assert cost.overrides["ksp_rtol"] == pytest.approx(1e-5)
    full = 10.0 ** (-np.arange(0, 400) / 20)       # 20 iterations per decade, run to 1e-20
    stopped = full[:np.argmax(full <= 1e-5) + 1]   # what the early-stopped solve records: up to the first below
    dropped = smoothed_iterations(full, 1e-3, 4.0) - smoothed_iterations(stopped, 1e-3, 4.0)
    assert 0 < dropped < 0.05
    assert cost(_outcome(stopped), TASK) == pytest.approx(smoothed_iterations(stopped, 1e-3, 4.0))


def test_work_is_setup_plus_flops_per_iteration_times_the_smoothed_count():
    relative = 10.0 ** -np.arange(11)
    outcome = _outcome(relative, flops=1000.0, setup_flops=500.0)
    count = smoothed_iterations(relative, 1e-6, 4.0)
    assert Work(1e-6)(outcome, TASK) == pytest.approx(1e-6 * (500.0 + 100.0 * count), rel=1e-12)
    with pytest.raises(ValueError, match="no flop count"):
        Work(1e-6)(_outcome(relative), TASK)


def test_early_stopped_area_equals_the_full_budget_area_on_a_real_solve():
    """Damped Jacobi on Poisson1D has a monotone residual (I − 0.45A is symmetric with spectral
    radius < 1), so every term after the floor is exactly zero: stopping there changes nothing."""
    task = Poisson1D(31).task(0)
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi", options={"ksp_richardson_scale": 0.9})
    cost = ResidualArea(1e-3, max_it=3000)
    stopped = oracle(task, cost.overrides)
    full = oracle(task, {"ksp_max_it": stopped.iterations + 200, "ksp_rtol": 0.0, "ksp_atol": 0.0})
    assert stopped.converged and len(full.residuals) == len(stopped.residuals) + 200
    assert cost(stopped, task) == pytest.approx(cost(full, task), rel=1e-14)
    assert cost(stopped, task) > 50


def test_ksporacle_counts_flops_per_iteration_exactly():
    """Every Richardson + Jacobi iteration does the same vector and matrix work."""
    task = Poisson1D(31).task(1)
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi")
    flops = [oracle(task, {"ksp_max_it": k, "ksp_rtol": 0.0, "ksp_atol": 0.0}).flops for k in (10, 11, 20)]
    assert flops[0] > 0 and flops[2] - flops[0] == pytest.approx(10 * (flops[1] - flops[0]), rel=1e-12)


# ---------------------------------------------------------------- budgets, and costs that check what they count

def test_every_cost_states_its_budget_and_overrides_are_derived_from_it():
    assert ResidualArea(1e-6, max_it=500).budget == Budget(rtol=1e-8, atol=0.0, max_it=500)
    assert ResidualArea(1e-6, stop=False).budget is None and ResidualArea(1e-6, stop=False).overrides == {}
    assert LogResidual(7).budget == Budget(rtol=0.0, atol=0.0, max_it=7)
    assert Iterations(1e-6, max_it=300).overrides == {"ksp_rtol": 1e-6, "ksp_atol": 0.0, "ksp_max_it": 300}
    assert Work(1e-4).budget == IterationProxy(1e-4, max_it=10_000).budget
    with pytest.raises(AttributeError):
        Iterations().overrides = {}  # read-only: the budget is the one source
    for bad in (dict(rtol=1.0), dict(rtol=-1e-3), dict(rtol=1e-6, atol=math.nan), dict(rtol=1e-6, max_it=0)):
        with pytest.raises(ValueError, match="Budget"):
            Budget(**bad)


def test_a_solve_that_stopped_above_the_tolerance_is_a_failure_not_a_count(caplog):
    """‖r‖/‖b‖ = 9.6e-6 after 12 iterations because the solver kept its own rtol 1e-5: not 12
    iterations to 1e-6. CONVERGED_ITS (no test at all) likewise; a history that used the whole
    budget is data for the smooth costs and a failure for the tolerance ones."""
    short = _outcome(np.concatenate([10.0 ** -np.linspace(0, 5, 12), [9.6e-6]]))
    assert math.isnan(Iterations(1e-6)(short, TASK))
    assert Iterations(1e-5)(short, TASK) == 12.0
    assert "relative residual of 9.6e-06 > 1e-06" in caplog.text
    assert math.isnan(LogWorkToTolerance(1e-6)(_outcome(short.residuals / 2.0, flops=1.0), TASK))
    assert math.isnan(ResidualArea(1e-4, max_it=1000)(short, TASK))  # floor 1e-6, 12 of 1000 iterations
    exhausted = _outcome(10.0 ** -np.linspace(0, 5, 13), reason=-3, converged=False, hit_max_it=True)
    assert ResidualArea(1e-4, max_it=12)(exhausted, TASK) > 0
    assert math.isnan(Iterations(1e-6, max_it=12)(exhausted, TASK))
    unchecked = _outcome(10.0 ** -np.linspace(0, 1, 6), norm_type="preconditioned", reason=4)  # CONVERGED_ITS
    assert math.isnan(Iterations(1e-6)(unchecked, TASK)) and math.isnan(IterationProxy(1e-6)(unchecked, TASK))


def test_a_real_solve_at_the_solvers_own_tolerance_fails_the_cost_and_the_budget_fixes_it():
    task = Poisson1D(31).task(0)
    oracle = KSPOracle(ksp_type="cg", pc_type="jacobi", rtol=1e-3)
    cost = Iterations(1e-6)
    (own,) = oracle.solve_many(task, [{}])
    (budgeted,) = oracle.solve_within(cost.budget, task, [{}])
    assert own.converged and math.isnan(cost(own, task))
    assert cost(budgeted, task) == budgeted.iterations > own.iterations
