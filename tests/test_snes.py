"""SNESOracle on small nonlinear systems with known roots (real PETSc SNES)."""
from __future__ import annotations

import numpy as np
import pytest

from solvers import Budget, PETSc
from solvers.snes import SNESOracle, forward_difference_jacobian

TARGETS = np.array([1.0, 8.0, 27.0, 0.125])


def cubes(task: np.ndarray, setting: dict, u: np.ndarray) -> np.ndarray:
    """F(u) = u³ − a (componentwise, coupled by a small symmetric term): root near a^(1/3)."""
    coupling = 0.1 * (np.roll(u, 1, axis=-1) + np.roll(u, -1, axis=-1))
    return u**3 + coupling - task - setting.get("shift", 0.0)


def cubes_jacobian(task: np.ndarray, setting: dict, u: np.ndarray) -> np.ndarray:
    n = u.size
    J = np.diag(3 * u**2)
    for i in range(n):
        J[i, (i + 1) % n] += 0.1
        J[i, (i - 1) % n] += 0.1
    return J


def start(task: np.ndarray, setting: dict) -> np.ndarray:
    return np.full(task.shape, 2.0)


def oracle(**kwargs) -> SNESOracle:
    config = dict(residual=cubes, initial_guess=start, problem_keys=("shift",), rtol=1e-12, atol=1e-14)
    config.update(kwargs)
    return SNESOracle(**config)


@pytest.mark.parametrize("jacobian, vectorized", [(cubes_jacobian, False), (None, False), (None, True)])
def test_converges_to_the_root_with_any_jacobian(jacobian, vectorized):
    outcome = oracle(jacobian=jacobian, vectorized=vectorized)(TARGETS)
    assert outcome.converged and not outcome.failed and outcome.error is None
    # Newton to round-off: the residual at the returned solution is at the atol / round-off level
    assert np.max(np.abs(cubes(TARGETS, {}, outcome.solution))) < 1e-12
    assert len(outcome.residuals) == outcome.iterations + 1
    assert outcome.residuals[0] == pytest.approx(np.linalg.norm(cubes(TARGETS, {}, start(TARGETS, {}))), rel=1e-12)
    assert outcome.residuals[-1] < 1e-12 * outcome.residuals[0] + 1e-14


def test_forward_difference_jacobian_is_accurate_to_sqrt_eps():
    u = np.array([0.3, -1.7, 2.5, 0.0])
    exact = cubes_jacobian(TARGETS, {}, u)
    approx = forward_difference_jacobian(lambda v: cubes(TARGETS, {}, v), u, cubes(TARGETS, {}, u))
    # step h = √eps·max(|u|, 1) ≈ 1.5e-8·2.5: truncation h·|F''|/2 ≈ 1.5e-8·2.5·7.5 < 1e-6, and
    # round-off eps·|F|/h ≈ 2e-16·20/1.5e-8 ≈ 3e-7 even at the zero entry
    np.testing.assert_allclose(approx, exact, atol=1e-6)


def test_problem_keys_reach_the_residual():
    outcome = oracle()(TARGETS, {"shift": 1.0})
    assert outcome.converged
    assert np.max(np.abs(cubes(TARGETS + 1.0, {}, outcome.solution))) < 1e-12


def test_no_root_is_a_failed_outcome_with_a_message():
    def no_root(task, setting, u):
        return u**2 + 1.0

    outcome = oracle(residual=no_root, max_it=20)(TARGETS)
    assert outcome.failed and not outcome.converged
    # Newton drives u towards 0, where J = 2u is singular: a line-search failure, max_it, or a
    # zero pivot in the LU (a PETSc error) depending on the path; each must say what happened
    assert outcome.error and ("did not converge" in outcome.error or "PETSc error" in outcome.error)


def test_max_it_is_a_failed_outcome():
    outcome = oracle()(TARGETS, {"snes_max_it": 2})
    assert outcome.failed and outcome.hit_max_it
    assert outcome.reason == PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT
    assert "DIVERGED_MAX_IT" in outcome.error
    assert outcome.iterations == 2 and len(outcome.residuals) == 3


def test_nan_in_the_residual_is_a_failed_outcome():
    def nan_after_first(task, setting, u):
        value = cubes(task, setting, u)
        if np.any(u < 1.9):  # every state but the initial one
            value[0] = np.nan
        return value

    outcome = oracle(residual=nan_after_first, jacobian=cubes_jacobian)(TARGETS)
    assert outcome.failed
    assert "did not converge" in outcome.error


def test_exception_in_the_residual_is_a_failed_outcome_carrying_its_message():
    def broken(task, setting, u):
        raise ArithmeticError("the wall model blew up")

    outcome = oracle(residual=broken)(TARGETS)
    assert outcome.failed
    assert "ArithmeticError" in outcome.error and "the wall model blew up" in outcome.error


def test_exception_in_the_jacobian_is_a_failed_outcome_carrying_its_message():
    def broken(task, setting, u):
        raise RuntimeError("no Jacobian today")

    outcome = oracle(jacobian=broken)(TARGETS)
    assert outcome.failed and "no Jacobian today" in outcome.error


def test_residual_of_the_wrong_shape_is_a_failed_outcome():
    outcome = oracle(residual=lambda task, setting, u: u[:-1])(TARGETS)
    assert outcome.failed and "shape" in outcome.error


def test_unknown_option_raises_value_error():
    with pytest.raises(ValueError, match="snes_linesearch_typo"):
        oracle()(TARGETS, {"snes_linesearch_typo": "bt"})


def test_invalid_option_value_raises_value_error():
    with pytest.raises(ValueError, match="rejected"):
        oracle()(TARGETS, {"snes_linesearch_type": "no_such_line_search"})


def test_options_are_removed_after_the_solve():
    solver = oracle()
    assert solver(TARGETS, {"snes_max_it": 1}).failed
    assert solver(TARGETS).converged
    assert not any(key.startswith(solver.prefix) for key in PETSc.Options().getAll())


def test_settings_apply_petsc_options():
    basic = oracle()(TARGETS, {"snes_linesearch_type": "basic"})
    assert basic.converged


def test_solve_many_warm_starts_from_the_first_solution():
    solver = oracle()
    first, near, far = solver.solve_many(TARGETS, [{}, {"shift": 1e-6}, {"u0": np.full(4, 5.0)}])
    assert first.converged and near.converged and far.converged
    # the warm start begins at the first solution, whose residual for the shifted problem is 1e-6 per entry
    assert near.residuals[0] == pytest.approx(1e-6 * np.sqrt(4), rel=1e-6)
    assert near.iterations < first.iterations
    # an explicit u0 wins over the warm start
    assert far.residuals[0] == pytest.approx(np.linalg.norm(cubes(TARGETS, {}, np.full(4, 5.0))), rel=1e-12)


def test_cold_solve_many_matches_single_solves():
    solver = oracle(warm_start=False)
    outcomes = solver.solve_many(TARGETS, [{}, {"shift": 0.5}])
    np.testing.assert_array_equal(outcomes[1].residuals, solver(TARGETS, {"shift": 0.5}).residuals)


def test_bad_initial_guess_raises_value_error():
    with pytest.raises(ValueError, match="non-finite"):
        oracle()(TARGETS, {"u0": np.array([1.0, np.nan, 1.0, 1.0])})


def test_bad_construction_raises_value_error():
    with pytest.raises(ValueError, match="max_it"):
        oracle(max_it=0)
    with pytest.raises(ValueError, match="rtol"):
        oracle(rtol=-1.0)


def test_history_holds_every_iteration_when_options_raise_max_it():
    def slow(task, setting, u):  # Newton on u⁴ only shrinks u by 3/4 per step: never done in 40
        return u**4

    outcome = oracle(residual=slow, max_it=5, rtol=1e-30, atol=1e-30, stol=0.0)(TARGETS, {"snes_max_it": 40})
    assert outcome.iterations == 40 and len(outcome.residuals) == 41


class Targets(np.ndarray):
    """The cube targets with the norm a budget's tolerance refers to: ‖F(u0 = 2)‖ for the unshifted problem."""

    @property
    def reference_norm(self) -> float:
        return float(np.linalg.norm(cubes(np.asarray(self), {}, np.full(self.shape, 2.0))))


def test_a_budget_becomes_newton_tolerances_on_the_tasks_reference_norm():
    task = TARGETS.view(Targets)
    solver = oracle(warm_start=False)
    assert solver.budget_options(Budget(rtol=1e-4, max_it=9), task) == {
        "snes_rtol": 0.0, "snes_atol": pytest.approx(1e-4 * task.reference_norm), "snes_max_it": 9}
    (loose,) = solver.solve_within(Budget(rtol=1e-4, max_it=50), task, [{}])
    assert loose.converged and loose.residuals[-1] <= 1e-4 * task.reference_norm < loose.residuals[-2]
    assert loose.iterations < solver(task).iterations
    with pytest.raises(ValueError, match="no reference norm"):
        solver.budget_options(Budget(rtol=1e-4), TARGETS)
