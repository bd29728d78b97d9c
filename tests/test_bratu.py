"""Bratu: residual/Jacobian consistency, and real PETSc Newton solves on the DMDA."""
from __future__ import annotations

import numpy as np
import pytest

from metasolve.method.cost import ResidualArea
from problems.bratu import Bratu, BratuOracle, embed, jacobian, residual
from solvers import Budget
from solvers.dmda_snes import DMDAProblem, DMDASNESOracle


def test_jacobian_matches_directional_differences_of_the_residual():
    rng = np.random.default_rng(0)
    u = embed(rng.uniform(0, 1, 7 * 7), 9)
    v = embed(rng.standard_normal(7 * 7), 9)
    step = 1e-6
    difference = (residual(u + step * v, 5.0) - residual(u - step * v, 5.0)).ravel() / (2 * step)
    exact = jacobian(u, 5.0) @ v.ravel()
    assert np.allclose(difference, exact, rtol=1e-8, atol=1e-9)
    # Boundary rows are 4u, interior diagonal 4 − h²λe^u.
    J = jacobian(u, 5.0).toarray()
    assert J[0, 0] == 4.0 and J[10, 10] == pytest.approx(4.0 - 5.0 * np.exp(u[1, 1]) / 64)


def test_newton_solves_bratu_and_an_exact_guess_needs_no_step():
    family = Bratu(n=17, lam_range=(6.0, 6.0))
    task = family.task(0)
    oracle = BratuOracle(rtol=1e-10)
    zero = oracle(task)
    assert zero.converged and 2 <= zero.iterations <= 8
    assert zero.residuals[-1] <= 1e-10 * task.reference_norm
    assert zero.residuals[0] == pytest.approx(task.reference_norm, rel=1e-12)
    u = embed(zero.solution, task.n)
    assert np.linalg.norm(residual(u, task.lam)) <= 1e-10 * task.reference_norm
    assert 0.7 < u.max() < 1.39  # the lower branch near the fold (u_max ≈ 1.39 at λ*)
    again = oracle(task, {"u0": zero.solution})
    assert again.converged and again.iterations == 0
    assert zero.flops > 0


def test_grid_sequencing_ends_on_the_same_grid_with_the_same_solution():
    task = Bratu(n=17, lam_range=(5.0, 5.0)).task(0)
    oracle = BratuOracle(rtol=1e-10)
    direct = oracle(task)
    sequenced = oracle.solve(task, {"snes_grid_sequence": 2})
    assert sequenced.outcome.converged and len(sequenced.level_iterations) == 3
    assert np.allclose(sequenced.outcome.solution, direct.solution, atol=1e-9)
    with pytest.raises(ValueError, match="integer"):
        oracle.solve(Bratu(n=16).task(0), {"snes_grid_sequence": 1})
    with pytest.raises(ValueError, match="never read"):
        oracle(task, {"snes_linesearch_typo": "bt"})


def test_bratu_rejects_lambda_beyond_the_fold():
    with pytest.raises(ValueError, match="fold"):
        Bratu(lam_range=(1.0, 7.0))


def test_a_cost_budget_becomes_newton_tolerances_relative_to_f_of_zero():
    task = Bratu(n=17, lam_range=(6.0, 6.0)).task(0)
    oracle = BratuOracle(rtol=1e-10)
    assert oracle.budget_options(Budget(rtol=1e-6, max_it=20), task) == {
        "snes_rtol": 0.0, "snes_atol": pytest.approx(1e-6 * task.reference_norm, rel=1e-15), "snes_max_it": 20}
    full = oracle(task)
    (loose,) = oracle.solve_within(Budget(rtol=1e-3, max_it=20), task, [{}])
    assert loose.converged and loose.residuals[-1] <= 1e-3 * task.reference_norm < loose.residuals[-2]
    assert loose.iterations < full.iterations
    (cut,) = oracle.solve_within(Budget(rtol=1e-12, max_it=1), task, [{}])
    assert cut.failed and cut.iterations == 1 and cut.hit_max_it


def test_linear_solver_tolerances_are_for_a_newton_krylov_setting_only():
    """Newton with preonly + LU reads no ksp_rtol (the keys a cost's `overrides` carried): naming
    them is the unread-option error; with a Krylov method inside Newton they are read."""
    task = Bratu(n=17, lam_range=(5.0, 5.0)).task(0)
    oracle = BratuOracle(rtol=1e-10)
    with pytest.raises(ValueError, match="ksp_rtol"):
        oracle(task, ResidualArea(1e-6).overrides)
    assert oracle(task, {"ksp_type": "gmres", "pc_type": "ilu", **ResidualArea(1e-6).overrides}).converged


def test_the_driver_is_configured_by_options_newton_krylov_reaches_the_same_root():
    task = Bratu(n=17, lam_range=(5.0, 5.0)).task(0)
    oracle = BratuOracle(rtol=1e-10)
    direct = oracle(task)
    krylov = oracle(task, {"ksp_type": "gmres", "pc_type": "ilu", "ksp_rtol": 1e-12})
    assert krylov.converged and krylov.solution is not None
    np.testing.assert_allclose(krylov.solution, direct.solution, atol=1e-9)


class Poisson(DMDAProblem):
    """−Δu = 1 (h²-scaled, ex5's boundary rows): linear, so Newton with LU takes one step."""

    def grid_shape(self, task):
        return (task, task)

    def residual(self, task, u):
        return residual(u, 0.0) - embed(np.ones((u.shape[0] - 2) ** 2), u.shape[0]) / (u.shape[0] - 1) ** 2

    def jacobian(self, task, u):
        return jacobian(u, 0.0)

    def reference_norm(self, task):
        return (task - 2) / (task - 1) ** 2


def test_any_dmda_problem_runs_on_the_generic_driver():
    outcome = DMDASNESOracle(Poisson(), rtol=1e-10)(9)
    assert outcome.converged and outcome.iterations == 1
    assert outcome.solution.shape == (81,) and outcome.solution.max() == pytest.approx(0.0737, abs=2e-3)
    with pytest.raises(ValueError, match="u0 has shape"):
        DMDASNESOracle(Poisson())(9, {"u0": np.zeros(7)})
